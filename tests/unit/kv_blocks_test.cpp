// The paged KV cache's block allocator: prefix reuse, reference counts, LRU eviction,
// exact hits under forced hash collisions, all-or-nothing allocation, preemption.
#include <gtest/gtest.h>

#include <numeric>

#include "elastic/engine/kv_blocks.h"
#include "runtime/error.h"

namespace {

using namespace troupe;
using elastic::kv_block_manager;
using ids = std::vector<int32_t>;

ids range(int32_t first, int32_t n) {
  ids v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), first);
  return v;
}

ids cat(ids a, const ids& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Invariant 1 and the reference counts against the live block tables.
void expect_consistent(const kv_block_manager& kv, const std::vector<elastic::kv_request_id>& live) {
  const auto s = kv.stats();
  EXPECT_EQ(s.blocks_used + s.blocks_cached + s.blocks_free, s.num_blocks);
  std::vector<int32_t> refs(static_cast<size_t>(kv.num_blocks()), 0);
  for (auto id : live)
    for (int32_t b : kv.block_table(id)) ++refs[static_cast<size_t>(b)];
  int64_t used = 0;
  for (int32_t b = 0; b < kv.num_blocks(); ++b) {
    EXPECT_EQ(kv.ref_count(b), refs[static_cast<size_t>(b)]) << "block " << b;
    used += refs[static_cast<size_t>(b)] > 0;
  }
  EXPECT_EQ(s.blocks_used, used);
}

TEST(KvBlocks, PrefixReuseAcrossTwoRequests) {
  kv_block_manager kv(8, 4);
  const ids a = range(1, 10);                    // blocks [1..4] [5..8] [9 10]
  const ids b = cat(range(1, 8), {50, 51, 52});  // shares the two full blocks
  auto ra = kv.allocate(1, a);
  ASSERT_TRUE(ra);
  EXPECT_EQ(ra->block_table, (ids{0, 1, 2}));
  EXPECT_EQ(ra->cached_tokens, 0);
  // Not computed yet: nothing is shared (another request must not read unwritten KV).
  EXPECT_EQ(kv.stats().blocks_hashed, 0);
  kv.mark_computed(1, 10);
  EXPECT_TRUE(kv.is_registered(0));
  EXPECT_TRUE(kv.is_registered(1));
  EXPECT_FALSE(kv.is_registered(2));  // partial
  EXPECT_EQ(kv.stats().blocks_hashed, 2);

  auto rb = kv.allocate(2, b);
  ASSERT_TRUE(rb);
  EXPECT_EQ(rb->cached_tokens, 8);
  EXPECT_EQ(rb->block_table, (ids{0, 1, 3}));
  EXPECT_EQ(kv.num_computed(2), 8);
  EXPECT_EQ(kv.ref_count(0), 2);
  EXPECT_EQ(kv.ref_count(1), 2);
  EXPECT_EQ(kv.ref_count(2), 1);
  EXPECT_EQ(kv.ref_count(3), 1);
  auto s = kv.stats();
  EXPECT_EQ(s.blocks_used, 4);
  EXPECT_EQ(s.blocks_free, 4);
  EXPECT_EQ(s.blocks_cached, 0);
  EXPECT_DOUBLE_EQ(s.usage(), 0.5);
  EXPECT_EQ(s.prefix_lookup_tokens, 21);
  EXPECT_EQ(s.prefix_hit_tokens, 8);
  EXPECT_DOUBLE_EQ(s.hit_rate(), 8.0 / 21.0);
  expect_consistent(kv, {1, 2});

  // Slots follow the block table.
  EXPECT_EQ(kv.slot(2, 0), 0);
  EXPECT_EQ(kv.slot(2, 5), 1 * 4 + 1);
  EXPECT_EQ(kv.slot(2, 9), 3 * 4 + 1);

  kv.free(1);  // blocks 0, 1 still held by 2; block 2 (unregistered) -> free
  EXPECT_EQ(kv.ref_count(0), 1);
  EXPECT_EQ(kv.ref_count(2), 0);
  s = kv.stats();
  EXPECT_EQ(s.blocks_used, 3);
  EXPECT_EQ(s.blocks_free, 5);
  kv.free(2);  // 0, 1 registered -> cached; 3 -> free
  s = kv.stats();
  EXPECT_EQ(s.blocks_used, 0);
  EXPECT_EQ(s.blocks_cached, 2);
  EXPECT_EQ(s.blocks_free, 6);
  EXPECT_EQ(s.blocks_hashed, 2);
  expect_consistent(kv, {});
}

TEST(KvBlocks, UncomputedBlocksAreNotShared) {
  kv_block_manager kv(8, 4);
  ASSERT_TRUE(kv.allocate(1, range(1, 10)));
  kv.mark_computed(1, 7);  // only block 0 is fully written
  auto r = kv.allocate(2, range(1, 10));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cached_tokens, 4);
  // Freeing a request whose blocks were never computed leaves nothing in the cache.
  kv.free(1);
  kv.free(2);
  EXPECT_EQ(kv.stats().blocks_hashed, 1);
  EXPECT_EQ(kv.stats().blocks_cached, 1);
}

TEST(KvBlocks, LastPromptTokenStaysUncached) {
  kv_block_manager kv(8, 4);
  ASSERT_TRUE(kv.allocate(1, range(1, 8)));
  kv.mark_computed(1, 8);
  EXPECT_EQ(kv.stats().blocks_hashed, 2);
  // The same 8 tokens: both blocks are cached, but the last token must be computed.
  auto r = kv.allocate(2, range(1, 8));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cached_tokens, 4);
  EXPECT_EQ(r->block_table, (ids{0, 2}));
  // Its own copy of block [5..8] duplicates block 1: not registered a second time.
  kv.mark_computed(2, 8);
  EXPECT_FALSE(kv.is_registered(2));
  EXPECT_EQ(kv.stats().blocks_hashed, 2);
  // A longer prompt with the same prefix hits both blocks of request 1.
  auto r3 = kv.allocate(3, cat(range(1, 8), {9}));
  ASSERT_TRUE(r3);
  EXPECT_EQ(r3->cached_tokens, 8);
  EXPECT_EQ(r3->block_table, (ids{0, 1, 3}));
  // A request that hit a block and computed a duplicate still chains on: block 2 of
  // request 2 is not registered, but request 2's next full block is (after block 1).
  ASSERT_TRUE(kv.append_token(2, 100));
  for (int32_t t : {101, 102, 103}) ASSERT_TRUE(kv.append_token(2, t));
  ASSERT_TRUE(kv.append_token(2, 104));  // marks 12 computed: block [100..103] registers
  EXPECT_EQ(kv.block_table(2), (ids{0, 2, 4, 5}));
  EXPECT_TRUE(kv.is_registered(4));
  auto r4 = kv.allocate(4, cat(range(1, 8), {100, 101, 102, 103, 7}));
  ASSERT_TRUE(r4);
  EXPECT_EQ(r4->cached_tokens, 12);
  EXPECT_EQ(r4->block_table, (ids{0, 1, 4, 6}));
  expect_consistent(kv, {1, 2, 3, 4});
}

TEST(KvBlocks, LruEvictionOrder) {
  kv_block_manager kv(4, 2);
  ASSERT_TRUE(kv.allocate(1, ids{1, 2, 3}));  // blocks 0 ([1 2], registered), 1
  kv.mark_computed(1, 3);
  ASSERT_TRUE(kv.allocate(2, ids{5, 6, 7}));  // blocks 2 ([5 6], registered), 3
  kv.mark_computed(2, 3);
  kv.free(1);  // free: [1]; lru: [0]
  kv.free(2);  // free: [1 3]; lru: [0 2]
  auto s = kv.stats();
  EXPECT_EQ(s.blocks_cached, 2);
  EXPECT_EQ(s.blocks_free, 2);

  // A hit takes block 0 out of the LRU list; freeing it again makes it most recent.
  auto r = kv.allocate(3, ids{1, 2, 9});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cached_tokens, 2);
  EXPECT_EQ(r->block_table, (ids{0, 1}));
  kv.free(3);  // free: [3 1]; lru: [2 0]

  // Three blocks of new content: both free blocks first, then the least recently used.
  auto n = kv.allocate(4, ids{20, 21, 22, 23, 24});
  ASSERT_TRUE(n);
  EXPECT_EQ(n->cached_tokens, 0);
  EXPECT_EQ(n->block_table, (ids{3, 1, 2}));
  EXPECT_EQ(kv.stats().evictions, 1);
  EXPECT_FALSE(kv.is_registered(2));
  EXPECT_TRUE(kv.is_registered(0));
  kv.free(4);
  // [5 6] was evicted, [1 2] survived.
  auto miss = kv.allocate(5, ids{5, 6, 7});
  ASSERT_TRUE(miss);
  EXPECT_EQ(miss->cached_tokens, 0);
  auto hit = kv.allocate(6, ids{1, 2, 8});
  ASSERT_TRUE(hit);
  EXPECT_EQ(hit->cached_tokens, 2);
  EXPECT_EQ(hit->block_table[0], 0);
  expect_consistent(kv, {5, 6});
}

TEST(KvBlocks, FreeHandsTheChainTailBackFirst) {
  kv_block_manager kv(4, 2);
  ASSERT_TRUE(kv.allocate(1, ids{1, 2, 3, 4, 5}));  // blocks 0 1 2
  kv.mark_computed(1, 5);                        // 0 and 1 registered
  kv.free(1);                                    // lru: [1 0]; free: [3 2]
  auto r = kv.allocate(2, ids{9, 9, 9, 9, 9, 9});   // 3 blocks: 3, 2, then evicts block 1
  ASSERT_TRUE(r);
  EXPECT_EQ(r->block_table, (ids{3, 2, 1}));
  EXPECT_TRUE(kv.is_registered(0));
  EXPECT_FALSE(kv.is_registered(1));
  kv.free(2);
  auto again = kv.allocate(3, ids{1, 2, 3, 4, 5});
  ASSERT_TRUE(again);
  EXPECT_EQ(again->cached_tokens, 2);  // the head survived
}

// Every block hashes to 42: hits are decided by the stored tokens.
uint64_t constant_hash(uint64_t, std::span<const int32_t>) { return 42; }

TEST(KvBlocks, ForcedHashCollisionNeverReturnsWrongKv) {
  kv_block_manager kv(8, 4, constant_hash);
  ASSERT_TRUE(kv.allocate(1, ids{1, 2, 3, 4, 5}));
  kv.mark_computed(1, 5);
  EXPECT_TRUE(kv.is_registered(0));
  auto r2 = kv.allocate(2, ids{9, 9, 9, 9, 5});  // same hash, other tokens: a miss
  ASSERT_TRUE(r2);
  EXPECT_EQ(r2->cached_tokens, 0);
  kv.mark_computed(2, 5);  // block 0 is live under 42: block 2 stays unregistered
  EXPECT_FALSE(kv.is_registered(2));
  auto r3 = kv.allocate(3, ids{1, 2, 3, 4, 6});  // a true hit
  ASSERT_TRUE(r3);
  EXPECT_EQ(r3->cached_tokens, 4);

  kv.free(1);
  kv.free(3);  // block 0 is cached now
  auto r4 = kv.allocate(4, ids{9, 9, 9, 9, 7});
  ASSERT_TRUE(r4);
  EXPECT_EQ(r4->cached_tokens, 0);
  kv.mark_computed(4, 5);  // the cached block of other content gives way
  const int32_t b4 = r4->block_table[0];
  EXPECT_TRUE(kv.is_registered(b4));
  EXPECT_FALSE(kv.is_registered(0));
  auto r5 = kv.allocate(5, ids{9, 9, 9, 9, 8});
  ASSERT_TRUE(r5);
  EXPECT_EQ(r5->cached_tokens, 4);
  EXPECT_EQ(r5->block_table[0], b4);
  expect_consistent(kv, {2, 4, 5});
}

// The hash ignores the parent: equal tokens after different prefixes collide, and only
// the stored parent registration tells them apart.
uint64_t parentless_hash(uint64_t, std::span<const int32_t> t) { return elastic::kv_block_hash(0, t); }

TEST(KvBlocks, SameTokensAfterADifferentPrefixAreAMiss) {
  kv_block_manager kv(16, 2, parentless_hash);
  ASSERT_TRUE(kv.allocate(1, ids{1, 1, 5, 5, 0}));  // [1 1] -> [5 5]
  kv.mark_computed(1, 5);
  ASSERT_TRUE(kv.allocate(2, ids{2, 2, 7, 7, 0}));  // [2 2] -> [7 7]
  kv.mark_computed(2, 5);
  auto r = kv.allocate(3, ids{2, 2, 5, 5, 0});  // [2 2] hits; [5 5] was computed after [1 1]
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cached_tokens, 2);
  auto ok = kv.allocate(4, ids{1, 1, 5, 5, 0});
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->cached_tokens, 4);
  // With the real hash the parent is in the hash itself: the same outcome.
  kv_block_manager real(16, 2);
  ASSERT_TRUE(real.allocate(1, ids{1, 1, 5, 5, 0}));
  real.mark_computed(1, 5);
  EXPECT_EQ(real.allocate(3, ids{2, 2, 5, 5, 0})->cached_tokens, 0);
  EXPECT_NE(elastic::kv_block_hash(elastic::kv_root_hash, ids{5, 5}), elastic::kv_block_hash(1, ids{5, 5}));
}

TEST(KvBlocks, OutOfBlocksChangesNothing) {
  kv_block_manager kv(3, 2);
  ASSERT_TRUE(kv.allocate(1, ids{1, 2, 3}));  // blocks 0 ([1 2]), 1
  kv.mark_computed(1, 3);
  kv.free(1);  // lru: [0]; free: [2 1]
  EXPECT_TRUE(kv.can_allocate(6));
  EXPECT_FALSE(kv.can_allocate(7));
  const auto before = kv.stats();
  // 7 tokens = 4 blocks; the hit on block 0 cannot also be evicted: 1 + 2 < 4.
  EXPECT_FALSE(kv.allocate(2, ids{1, 2, 3, 4, 5, 6, 7}));
  const auto after = kv.stats();
  EXPECT_EQ(after.blocks_used, before.blocks_used);
  EXPECT_EQ(after.blocks_cached, before.blocks_cached);
  EXPECT_EQ(after.blocks_free, before.blocks_free);
  EXPECT_EQ(after.blocks_hashed, before.blocks_hashed);
  EXPECT_EQ(after.prefix_lookup_tokens, before.prefix_lookup_tokens);
  EXPECT_EQ(after.evictions, before.evictions);
  EXPECT_FALSE(kv.contains(2));
  EXPECT_TRUE(kv.is_registered(0));
  EXPECT_EQ(kv.ref_count(0), 0);

  auto r = kv.allocate(2, ids{1, 2, 3, 4, 5});  // 3 blocks: the hit + 2 free
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cached_tokens, 2);
  EXPECT_EQ(r->block_table, (ids{0, 2, 1}));
  EXPECT_EQ(kv.stats().evictions, 0);
  // Full: appending past the last block fails and leaves the request as it was.
  ASSERT_TRUE(kv.append_token(2, 6));
  EXPECT_FALSE(kv.append_token(2, 7));
  EXPECT_EQ(kv.num_tokens(2), 6);
  EXPECT_EQ(kv.block_table(2).size(), 3u);
  expect_consistent(kv, {2});
}

TEST(KvBlocks, PreemptionThenReallocateHitsTheCache) {
  kv_block_manager kv(6, 4);
  const ids prompt = range(1, 6);
  auto r = kv.allocate(1, prompt);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->block_table, (ids{0, 1}));
  // Decode: each append marks every earlier token computed.
  ASSERT_TRUE(kv.append_token(1, 7));
  ASSERT_TRUE(kv.append_token(1, 8));   // block 1 is full, its last KV not yet written
  EXPECT_FALSE(kv.is_registered(1));
  ASSERT_TRUE(kv.append_token(1, 9));   // 8 computed: block 1 registers; block 2 taken
  EXPECT_TRUE(kv.is_registered(1));
  EXPECT_EQ(kv.block_table(1), (ids{0, 1, 2}));
  EXPECT_EQ(kv.num_tokens(1), 9);
  EXPECT_EQ(kv.num_computed(1), 8);

  kv.free(1);  // preempted by recompute
  auto again = kv.allocate(1, range(1, 9));  // prompt + generated so far
  ASSERT_TRUE(again);
  EXPECT_EQ(again->cached_tokens, 8);
  EXPECT_EQ(again->block_table[0], 0);
  EXPECT_EQ(again->block_table[1], 1);
  const auto s = kv.stats();
  EXPECT_EQ(s.prefix_lookup_tokens, 6 + 9);
  EXPECT_EQ(s.prefix_hit_tokens, 8);
  EXPECT_DOUBLE_EQ(s.hit_rate(), 8.0 / 15.0);
  EXPECT_EQ(s.evictions, 0);
  expect_consistent(kv, {1});
}

TEST(KvBlocks, ErrorsNameTheRequest) {
  kv_block_manager kv(4, 2);
  ASSERT_TRUE(kv.allocate(1, ids{1, 2}));
  auto expect_invalid = [](auto&& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one mentioning " << needle;
    } catch (const runtime::error& e) {
      EXPECT_EQ(e.code(), runtime::errc::invalid_argument);
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    }
  };
  const auto before = kv.stats();
  expect_invalid([&] { kv.allocate(1, ids{3, 4}); }, "request 1 is already allocated");
  expect_invalid([&] { kv.append_token(77, 1); }, "unknown request 77");
  expect_invalid([&] { kv.free(78); }, "unknown request 78");
  expect_invalid([&] { kv.block_table(79); }, "unknown request 79");
  expect_invalid([&] { kv.allocate(2, ids{}); }, "request 2 has an empty prompt");
  expect_invalid([&] { kv.mark_computed(1, 3); }, "request 1 has 2 tokens");
  expect_invalid([] { kv_block_manager(0, 4); }, "num_blocks 0");
  expect_invalid([] { kv_block_manager(4, 0); }, "block_size 0");
  EXPECT_EQ(kv.stats().blocks_used, before.blocks_used);
  EXPECT_EQ(kv.stats().prefix_lookup_tokens, before.prefix_lookup_tokens);
  EXPECT_EQ(kv.block_table(1), (ids{0}));
}

}  // namespace
