// elastic/engine/kv_blocks.cpp — the paged KV cache's block allocator and prefix cache.
#include "elastic/engine/kv_blocks.h"

#include <algorithm>

#include "runtime/error.h"

namespace troupe::elastic {

using runtime::errc;

uint64_t kv_block_hash(uint64_t parent_hash, std::span<const int32_t> tokens) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a offset basis
  auto mix_bytes = [&h](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ull;  // FNV prime
    }
  };
  mix_bytes(&parent_hash, sizeof parent_hash);
  const uint64_t n = tokens.size();
  mix_bytes(&n, sizeof n);
  mix_bytes(tokens.data(), tokens.size_bytes());
  // splitmix64 finaliser: spreads FNV's weak high bits.
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

kv_block_manager::kv_block_manager(int64_t num_blocks, int64_t block_size, kv_block_hash_fn hash)
    : block_size_(block_size), hash_(std::move(hash)) {
  TROUPE_CHECK(num_blocks >= 1 && num_blocks <= INT32_MAX, errc::invalid_argument,
               "kv_block_manager: num_blocks {} must be in [1, 2^31); size the KV budget", num_blocks);
  TROUPE_CHECK(block_size >= 1, errc::invalid_argument, "kv_block_manager: block_size {} must be >= 1",
               block_size);
  TROUPE_CHECK(static_cast<bool>(hash_), errc::invalid_argument, "kv_block_manager: empty hash function");
  blocks_.resize(static_cast<size_t>(num_blocks));
  for (int64_t b = 0; b < num_blocks; ++b) free_.push_back(static_cast<int32_t>(b));
}

kv_block_manager::request_state& kv_block_manager::find(kv_request_id id, const char* what) {
  auto it = requests_.find(id);
  TROUPE_CHECK(it != requests_.end(), errc::invalid_argument,
               "kv_block_manager::{}: unknown request {} (never allocated or already freed)", what, id);
  return it->second;
}

const kv_block_manager::request_state& kv_block_manager::find(kv_request_id id, const char* what) const {
  auto it = requests_.find(id);
  TROUPE_CHECK(it != requests_.end(), errc::invalid_argument,
               "kv_block_manager::{}: unknown request {} (never allocated or already freed)", what, id);
  return it->second;
}

bool kv_block_manager::can_allocate(int64_t n_tokens) const {
  return n_tokens >= 0 && blocks_for(n_tokens) <= available();
}

uint64_t kv_block_manager::chain_hash(const request_state& r, size_t i) const {
  const uint64_t parent = i == 0 ? kv_root_hash : r.hashes[i - 1];
  return hash_(parent, std::span<const int32_t>(r.tokens).subspan(i * static_cast<size_t>(block_size_),
                                                                  static_cast<size_t>(block_size_)));
}

std::optional<kv_allocation> kv_block_manager::allocate(kv_request_id id, std::span<const int32_t> prompt,
                                                        const kv_allocate_options& o) {
  TROUPE_CHECK(!requests_.count(id), errc::invalid_argument,
               "kv_block_manager::allocate: request {} is already allocated; free it first", id);
  TROUPE_CHECK(!prompt.empty(), errc::invalid_argument, "kv_block_manager::allocate: request {} has an empty prompt",
               id);
  const auto n = static_cast<int64_t>(prompt.size());
  const auto bs = static_cast<size_t>(block_size_);

  request_state r;
  r.tokens.assign(prompt.begin(), prompt.end());
  for (size_t i = 0; i < static_cast<size_t>(n / block_size_); ++i) r.hashes.push_back(chain_hash(r, i));

  // Longest verified prefix of cached blocks, leaving the last prompt token uncached.
  std::vector<int32_t> hits;
  const auto max_hits = o.use_cache ? static_cast<size_t>((n - 1) / block_size_) : size_t{0};
  for (size_t i = 0; i < max_hits; ++i) {
    auto it = by_hash_.find(r.hashes[i]);
    if (it == by_hash_.end()) break;
    const block_info& c = blocks_[static_cast<size_t>(it->second)];
    const uint64_t parent = i == 0 ? 0 : r.chain[i - 1];
    const bool same = c.parent_serial == parent && std::equal(c.tokens.begin(), c.tokens.end(), r.tokens.begin() + static_cast<std::ptrdiff_t>(i * bs));
    if (!same) break;  // a collision or a stale entry: a miss, never wrong KV
    hits.push_back(it->second);
    r.chain.push_back(c.serial);
  }
  // Another sample of this prompt: its computed full blocks, cached or not (invariant 4).
  if (o.share_from && o.use_cache) {
    const auto p = requests_.find(*o.share_from);
    if (p != requests_.end()) {
      const request_state& q = p->second;
      const size_t k = std::min(max_hits, static_cast<size_t>(q.computed / block_size_));
      const size_t same = static_cast<size_t>(
          std::mismatch(q.tokens.begin(), q.tokens.begin() + static_cast<std::ptrdiff_t>(std::min(q.tokens.size(), k * bs)),
                        r.tokens.begin())
              .first -
          q.tokens.begin());
      const size_t blocks = std::min(k, same / bs);
      if (blocks > hits.size()) {
        hits.assign(q.table.begin(), q.table.begin() + static_cast<std::ptrdiff_t>(blocks));
        r.chain.assign(q.chain.begin(), q.chain.begin() + static_cast<std::ptrdiff_t>(std::min(blocks, q.chain.size())));
        r.chain.resize(blocks, 0);
      }
    }
  }

  const int64_t reusable_cached = std::count_if(hits.begin(), hits.end(), [this](int32_t b) {
    return blocks_[static_cast<size_t>(b)].ref_count == 0;
  });
  const int64_t need = blocks_for(n) - static_cast<int64_t>(hits.size());
  if (need > available() - reusable_cached) return std::nullopt;

  for (int32_t b : hits) {
    block_info& c = blocks_[static_cast<size_t>(b)];
    if (c.ref_count++ == 0) lru_.erase(c.lru_pos);
    r.table.push_back(b);
  }
  for (int64_t k = 0; k < need; ++k) r.table.push_back(take_block());

  r.computed = static_cast<int64_t>(hits.size()) * block_size_;
  lookup_tokens_ += n;
  hit_tokens_ += r.computed;
  kv_allocation out{r.table, r.computed};
  requests_.emplace(id, std::move(r));
  return out;
}

bool kv_block_manager::append_token(kv_request_id id, int32_t token) {
  request_state& r = find(id, "append_token");
  const auto n = static_cast<int64_t>(r.tokens.size());
  const bool new_block = n == static_cast<int64_t>(r.table.size()) * block_size_;
  if (new_block && available() == 0) return false;
  // The model produced `token` from every earlier one, so their KV is written.
  r.computed = n;
  register_computed(r);
  if (new_block) r.table.push_back(take_block());
  r.tokens.push_back(token);
  if (r.tokens.size() % static_cast<size_t>(block_size_) == 0)
    r.hashes.push_back(chain_hash(r, r.tokens.size() / static_cast<size_t>(block_size_) - 1));
  return true;
}

void kv_block_manager::mark_computed(kv_request_id id, int64_t n) {
  request_state& r = find(id, "mark_computed");
  TROUPE_CHECK(n >= 0 && n <= static_cast<int64_t>(r.tokens.size()), errc::invalid_argument,
               "kv_block_manager::mark_computed: request {} has {} tokens, cannot mark {} computed", id,
               r.tokens.size(), n);
  if (n <= r.computed) return;
  r.computed = n;
  register_computed(r);
}

void kv_block_manager::register_computed(request_state& r) {
  const auto full = static_cast<size_t>(r.computed / block_size_);
  for (size_t i = r.chain.size(); i < full; ++i) {
    const uint64_t parent = i == 0 ? 0 : r.chain[i - 1];
    if (i > 0 && parent == 0) {  // the chain broke earlier: nothing after it can be found
      r.chain.push_back(0);
      continue;
    }
    const uint64_t h = r.hashes[i];
    const auto first = r.tokens.begin() + static_cast<std::ptrdiff_t>(i * static_cast<size_t>(block_size_));
    auto it = by_hash_.find(h);
    if (it != by_hash_.end()) {
      const int32_t cb = it->second;
      block_info& c = blocks_[static_cast<size_t>(cb)];
      if (c.parent_serial == parent && std::equal(c.tokens.begin(), c.tokens.end(), first)) {
        r.chain.push_back(c.serial);  // the same content is already cached in block cb
        continue;
      }
      if (c.ref_count > 0) {  // a live block holds this hash: leave ours unregistered
        r.chain.push_back(0);
        continue;
      }
      // A cached block of other content (a collision, or orphaned by its parent's
      // eviction) gives way to ours.
      lru_.erase(c.lru_pos);
      unregister(cb);
      free_.push_back(cb);
    }
    const int32_t b = r.table[i];
    block_info& mine = blocks_[static_cast<size_t>(b)];
    mine.registered = true;
    mine.hash = h;
    mine.serial = next_serial_++;
    mine.parent_serial = parent;
    mine.tokens.assign(first, first + block_size_);
    by_hash_[h] = b;
    r.chain.push_back(mine.serial);
  }
}

void kv_block_manager::unregister(int32_t b) {
  block_info& c = blocks_[static_cast<size_t>(b)];
  auto it = by_hash_.find(c.hash);
  if (it != by_hash_.end() && it->second == b) by_hash_.erase(it);
  c.registered = false;
  c.hash = c.serial = c.parent_serial = 0;
  c.tokens.clear();
}

int32_t kv_block_manager::take_block() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.front();
    free_.pop_front();
  } else {
    TROUPE_CHECK(!lru_.empty(), errc::internal, "kv_block_manager: no block left to take");
    b = lru_.front();
    lru_.pop_front();
    unregister(b);
    ++evictions_;
  }
  blocks_[static_cast<size_t>(b)].ref_count = 1;
  return b;
}

void kv_block_manager::free(kv_request_id id) {
  request_state& r = find(id, "free");
  for (auto it = r.table.rbegin(); it != r.table.rend(); ++it) {
    block_info& c = blocks_[static_cast<size_t>(*it)];
    if (--c.ref_count > 0) continue;
    if (c.registered) {
      lru_.push_back(*it);
      c.lru_pos = std::prev(lru_.end());
    } else {
      free_.push_back(*it);
    }
  }
  requests_.erase(id);
}

const std::vector<int32_t>& kv_block_manager::block_table(kv_request_id id) const {
  return find(id, "block_table").table;
}

int64_t kv_block_manager::num_tokens(kv_request_id id) const {
  return static_cast<int64_t>(find(id, "num_tokens").tokens.size());
}

int64_t kv_block_manager::num_computed(kv_request_id id) const { return find(id, "num_computed").computed; }

int64_t kv_block_manager::slot(kv_request_id id, int64_t pos) const {
  const request_state& r = find(id, "slot");
  TROUPE_CHECK(pos >= 0 && pos < static_cast<int64_t>(r.tokens.size()), errc::out_of_range,
               "kv_block_manager::slot: position {} outside request {}'s {} tokens", pos, id, r.tokens.size());
  return int64_t{r.table[static_cast<size_t>(pos / block_size_)]} * block_size_ + pos % block_size_;
}

int32_t kv_block_manager::ref_count(int32_t block) const {
  TROUPE_CHECK(block >= 0 && block < num_blocks(), errc::out_of_range, "kv_block_manager: block {} outside [0, {})",
               block, num_blocks());
  return blocks_[static_cast<size_t>(block)].ref_count;
}

bool kv_block_manager::is_registered(int32_t block) const {
  TROUPE_CHECK(block >= 0 && block < num_blocks(), errc::out_of_range, "kv_block_manager: block {} outside [0, {})",
               block, num_blocks());
  return blocks_[static_cast<size_t>(block)].registered;
}

kv_block_stats kv_block_manager::stats() const {
  kv_block_stats s;
  s.num_blocks = num_blocks();
  s.blocks_cached = static_cast<int64_t>(lru_.size());
  s.blocks_free = static_cast<int64_t>(free_.size());
  s.blocks_used = s.num_blocks - s.blocks_cached - s.blocks_free;
  s.blocks_hashed = static_cast<int64_t>(by_hash_.size());
  s.prefix_lookup_tokens = lookup_tokens_;
  s.prefix_hit_tokens = hit_tokens_;
  s.evictions = evictions_;
  return s;
}

}  // namespace troupe::elastic
