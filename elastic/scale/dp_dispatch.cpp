// elastic/scale/dp_dispatch.cpp — see dp_dispatch.h.
#include "elastic/scale/dp_dispatch.h"

#include <algorithm>
#include <limits>

#include "elastic/engine/kv_blocks.h"
#include "runtime/error.h"

namespace troupe::elastic {

using runtime::errc;

dp_least_kv_prefix::dp_least_kv_prefix(int ranks, int64_t block_size, int64_t slack_blocks, size_t max_blocks)
    : block_size_(block_size), slack_(slack_blocks), max_blocks_(max_blocks), ranks_(static_cast<size_t>(ranks)) {
  TROUPE_CHECK(ranks >= 1 && block_size >= 1 && max_blocks >= 1, errc::invalid_argument,
               "least_kv_prefix dispatch: ranks {} and block size {} must be >= 1", ranks, block_size);
}

std::vector<uint64_t> dp_least_kv_prefix::hashes(std::span<const int32_t> prompt) const {
  std::vector<uint64_t> out;
  uint64_t h = kv_root_hash;
  const auto bs = static_cast<size_t>(block_size_);
  for (size_t i = 0; i + bs <= prompt.size(); i += bs) {
    h = kv_block_hash(h, prompt.subspan(i, bs));
    out.push_back(h);
  }
  return out;
}

int64_t dp_least_kv_prefix::prefix_blocks(int rank, std::span<const int32_t> prompt) const {
  const rank_memory& m = ranks_.at(static_cast<size_t>(rank));
  int64_t n = 0;
  for (uint64_t h : hashes(prompt)) {
    if (!m.where.count(h)) break;
    ++n;
  }
  return n;
}

int dp_least_kv_prefix::pick(std::span<const int32_t> prompt, std::span<const dp_rank_load> loads) {
  const int P = static_cast<int>(ranks_.size());
  TROUPE_CHECK(static_cast<int>(loads.size()) == P, errc::invalid_argument,
               "least_kv_prefix dispatch: {} loads for {} ranks", loads.size(), P);
  int least = 0;
  for (int r = 1; r < P; ++r)
    if (loads[static_cast<size_t>(r)].load() < loads[static_cast<size_t>(least)].load()) least = r;
  const int64_t floor = loads[static_cast<size_t>(least)].load();
  const int64_t slack = slack_ >= 0 ? slack_ : std::max<int64_t>(1, loads[static_cast<size_t>(least)].num_blocks / 16);
  const auto hs = hashes(prompt);
  int best = -1;
  int64_t best_len = 0;
  for (int r = 0; r < P; ++r) {
    if (loads[static_cast<size_t>(r)].load() > floor + slack) continue;
    const rank_memory& m = ranks_[static_cast<size_t>(r)];
    int64_t n = 0;
    while (n < static_cast<int64_t>(hs.size()) && m.where.count(hs[static_cast<size_t>(n)])) ++n;
    if (n > best_len) {
      best_len = n;
      best = r;
    }
  }
  return best >= 0 ? best : least;
}

void dp_least_kv_prefix::dispatched(int rank, std::span<const int32_t> prompt) {
  rank_memory& m = ranks_.at(static_cast<size_t>(rank));
  for (uint64_t h : hashes(prompt)) {
    auto it = m.where.find(h);
    if (it != m.where.end()) m.lru.erase(it->second);
    m.lru.push_back(h);
    m.where[h] = std::prev(m.lru.end());
  }
  while (m.lru.size() > max_blocks_) {
    m.where.erase(m.lru.front());
    m.lru.pop_front();
  }
}

void dp_least_kv_prefix::resize(int ranks) {
  TROUPE_CHECK(ranks >= 1, errc::invalid_argument, "least_kv_prefix dispatch: {} ranks", ranks);
  ranks_.resize(static_cast<size_t>(ranks));
}

void dp_least_kv_prefix::remove(int rank) {
  TROUPE_CHECK(rank >= 0 && rank < static_cast<int>(ranks_.size()) && ranks_.size() > 1, errc::invalid_argument,
               "least_kv_prefix dispatch: removing rank {} of {}", rank, ranks_.size());
  ranks_.erase(ranks_.begin() + rank);
}

std::unique_ptr<dp_dispatch_policy> make_dp_dispatch(const std::string& name, int ranks, int64_t block_size) {
  if (name.empty() || name == "least_kv_prefix") return std::make_unique<dp_least_kv_prefix>(ranks, block_size);
  if (name == "round_robin") return std::make_unique<dp_round_robin>(ranks);
  TROUPE_THROW(errc::invalid_argument, "dispatch policy '{}' is not one of least_kv_prefix, round_robin", name);
}

}  // namespace troupe::elastic
