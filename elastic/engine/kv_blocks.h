// elastic/engine/kv_blocks.h — the block allocator of the paged KV cache, with prefix caching.
//
//   kv_block_manager kv(/*num_blocks=*/1024, /*block_size=*/16);
//   auto a = kv.allocate(/*request_id=*/7, prompt_ids);   // nullopt: not enough blocks, wait
//   // prefill prompt_ids[a->cached_tokens:] writing KV into slots kv.slot(7, pos) ...
//   if (!kv.append_token(7, next_id)) { kv.free(7); /* preempt: re-allocate later */ }
//   kv.free(7);                                            // blocks become cached / free
//
// A request's KV lives in whole blocks of block_size token slots; its block table lists
// them in order, so token position p sits in slot block_table[p / block_size] * block_size
// + p % block_size. A FULL block whose KV has been computed is registered in the prefix
// cache under a hash chained over (parent block's hash, the block's token ids); a later
// prompt starting with the same tokens reuses it instead of recomputing.
//
// Invariants:
//   1. A block is in exactly one state: used (ref_count > 0, in some block tables), cached
//      (ref_count 0, registered, in the LRU list: evictable) or free (ref_count 0, not
//      registered). used + cached + free == num_blocks.
//   2. A hit is exact, never just a hash match: a registered block stores its tokens and
//      the registration it was computed after (its parent), and a lookup checks both, so
//      a hash collision costs a cache miss, never wrong KV. One block per hash: a cached
//      (evictable) block of other content under the same hash gives way to a new one.
//   3. Only computed KV is shared: a block is registered when it is full and its tokens'
//      KV is marked computed — by mark_computed(), or by append_token(), which implies the
//      KV of every earlier token was written (the model produced the new token from them).
//      Freeing a request before its KV was computed never leaves garbage in the cache.
//   4. allocate() leaves the last prompt token uncached (cached_tokens <= prompt size - 1),
//      so the model always runs over it and produces the logits of the next token. With
//      share_from (another sample of the same prompt) the other request's computed full blocks
//      are shared whether or not they are in the prefix cache; with use_cache = false nothing is
//      reused (every prompt token is computed again: prompt logprobs).
//   5. New blocks come from the free blocks first (lowest id first initially, then in
//      the order they were freed); only when none is left is the least recently used
//      cached block evicted (its hash entry removed). free() hands a request's blocks
//      back last block first, so a chain's tail is evicted before its head.
//   6. A call that fails (nullopt / false / an error) changes nothing, statistics included.
//   7. Thread-compatible: one owner (the scheduler) calls it; no locking.
#pragma once
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace troupe::elastic {

using kv_request_id = uint64_t;

// The hash of a full block: chained over the parent block's hash (kv_root_hash for the
// first block) and the block's tokens. 64-bit FNV-1a over the bytes, finished with the
// splitmix64 mixer.
using kv_block_hash_fn = std::function<uint64_t(uint64_t parent_hash, std::span<const int32_t> tokens)>;
inline constexpr uint64_t kv_root_hash = 0x9e3779b97f4a7c15ull;
uint64_t kv_block_hash(uint64_t parent_hash, std::span<const int32_t> tokens);

struct kv_allocation {
  std::vector<int32_t> block_table;  // ceil(prompt size / block_size) block ids, in order
  int64_t cached_tokens = 0;         // prompt tokens whose KV is already there (multiple of block_size)
};

struct kv_allocate_options {
  bool use_cache = true;                    // false: no prefix hits
  std::optional<kv_request_id> share_from;  // an allocated request with the same prompt (samples of one prompt)
};

struct kv_block_stats {
  int64_t num_blocks = 0;
  int64_t blocks_used = 0;    // ref_count > 0
  int64_t blocks_cached = 0;  // ref_count 0, registered: evictable
  int64_t blocks_free = 0;    // ref_count 0, not registered
  int64_t blocks_hashed = 0;  // registered, used or cached
  int64_t prefix_lookup_tokens = 0;  // prompt tokens of every successful allocate()
  int64_t prefix_hit_tokens = 0;     // of those, tokens served from the cache
  int64_t evictions = 0;             // cached blocks taken for new content
  double usage() const { return num_blocks ? double(blocks_used) / double(num_blocks) : 0.0; }
  double hit_rate() const { return prefix_lookup_tokens ? double(prefix_hit_tokens) / double(prefix_lookup_tokens) : 0.0; }
};

class kv_block_manager {
 public:
  // num_blocks >= 1, block_size >= 1; `hash` may be replaced (tests force collisions).
  kv_block_manager(int64_t num_blocks, int64_t block_size, kv_block_hash_fn hash = kv_block_hash);

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t block_size() const { return block_size_; }
  int64_t blocks_for(int64_t n_tokens) const { return (n_tokens + block_size_ - 1) / block_size_; }

  // Whether n_tokens fit without any prefix hit: blocks_for(n_tokens) <= free + cached.
  bool can_allocate(int64_t n_tokens) const;

  // Takes the blocks of a new request's prompt (non-empty), reusing cached prefix blocks.
  // nullopt when the free + cached blocks do not suffice (nothing changes then).
  // Throws errc::invalid_argument on a request id already allocated or an empty prompt.
  std::optional<kv_allocation> allocate(kv_request_id id, std::span<const int32_t> prompt,
                                       const kv_allocate_options& o = {});

  // Appends one generated token (a new slot; a new block when the last one is full) and
  // marks the KV of all earlier tokens computed. false when a new block is needed and none
  // is left (nothing changes: preempt someone and retry). Throws on an unknown request.
  bool append_token(kv_request_id id, int32_t token);

  // The KV of the request's first n tokens is written (n <= num_tokens(id); an n below the
  // current count is ignored); registers the full blocks among them. Call after each
  // prefill chunk, so other requests can hit those blocks before this one decodes.
  void mark_computed(kv_request_id id, int64_t n);

  // Releases the request: each block's ref_count drops; at 0 a registered block becomes
  // cached (evictable), any other free. Throws on an unknown request.
  void free(kv_request_id id);

  bool contains(kv_request_id id) const { return requests_.count(id) != 0; }
  const std::vector<int32_t>& block_table(kv_request_id id) const;
  int64_t num_tokens(kv_request_id id) const;
  int64_t num_computed(kv_request_id id) const;
  // The cache slot of token position pos of the request: block * block_size + offset.
  int64_t slot(kv_request_id id, int64_t pos) const;

  int32_t ref_count(int32_t block) const;
  bool is_registered(int32_t block) const;
  kv_block_stats stats() const;

 private:
  struct block_info {
    int32_t ref_count = 0;
    bool registered = false;
    uint64_t hash = 0;
    uint64_t serial = 0;         // this registration, unique; 0 = none
    uint64_t parent_serial = 0;  // the registration of the block before it; 0 for a first block
    std::vector<int32_t> tokens;
    std::list<int32_t>::iterator lru_pos;  // valid while cached
  };
  struct request_state {
    std::vector<int32_t> tokens;
    std::vector<int32_t> table;
    // chain[i]: the serial of a registration whose whole prefix equals blocks 0..i of this
    // request (its own block's or the one it hit); 0 = broken (a collision blocked it).
    std::vector<uint64_t> chain;
    std::vector<uint64_t> hashes;  // hashes[i]: the chained hash of full block i
    int64_t computed = 0;
  };

  request_state& find(kv_request_id id, const char* what);
  const request_state& find(kv_request_id id, const char* what) const;
  int64_t available() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  int32_t take_block();                    // from free_, else evicts lru_.front(); ref_count 1
  void unregister(int32_t b);
  void register_computed(request_state& r);  // registers full computed blocks past chain.size()
  uint64_t chain_hash(const request_state& r, size_t i) const;  // hash of block i of r

  int64_t block_size_;
  kv_block_hash_fn hash_;
  std::vector<block_info> blocks_;
  std::list<int32_t> free_;  // front is taken first
  std::list<int32_t> lru_;   // front is the least recently used
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::unordered_map<kv_request_id, request_state> requests_;
  uint64_t next_serial_ = 1;
  int64_t lookup_tokens_ = 0, hit_tokens_ = 0, evictions_ = 0;
};

}  // namespace troupe::elastic
