// parallel/data/packed_dataset.cpp — splits, sequence packing, seeded epoch order, dp batches.
#include "parallel/data/packed_dataset.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "runtime/error.h"

namespace troupe::parallel {

using runtime::errc;

namespace {

const char* split_name(data_split s) { return s == data_split::train ? "train" : "val"; }

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [0, bound) by rejection: the same on every platform (std distributions are not).
uint64_t uniform_below(std::mt19937_64& rng, uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % bound;
  }
}

}  // namespace

packed_dataset::packed_dataset(token_span tokens, packed_config cfg) : tokens_(std::move(tokens)), cfg_(cfg) {
  const int64_t T = cfg_.seq_len;
  const int64_t N = tokens_.size;
  TROUPE_CHECK(T > 0, errc::invalid_argument, "packed_dataset: seq_len must be positive, got {}", T);
  TROUPE_CHECK(cfg_.val_fraction >= 0.0 && cfg_.val_fraction < 1.0, errc::invalid_argument,
               "packed_dataset: val_fraction must be in [0, 1), got {}", cfg_.val_fraction);
  TROUPE_CHECK(cfg_.val_chunks >= 1, errc::invalid_argument, "packed_dataset: val_chunks must be >= 1, got {}",
               cfg_.val_chunks);
  TROUPE_CHECK(N / cfg_.val_chunks >= 1, errc::invalid_argument,
               "packed_dataset: {} tokens cannot be cut into {} val_chunks", N, cfg_.val_chunks);
  for (int64_t r = 0; r < cfg_.val_chunks; ++r) {
    const int64_t begin = N * r / cfg_.val_chunks;
    const int64_t end = N * (r + 1) / cfg_.val_chunks;
    const int64_t val = static_cast<int64_t>(std::llround(cfg_.val_fraction * static_cast<double>(end - begin)));
    add_range(train_, begin, end - val);
    add_range(val_, end - val, end);
  }
  TROUPE_CHECK(train_.total > 0, errc::invalid_argument,
               "packed_dataset: the train split has no sequence of seq_len + 1 = {} tokens ({} tokens, val_fraction "
               "{}, val_chunks {}); lower seq_len or use more data",
               T + 1, N, cfg_.val_fraction, cfg_.val_chunks);
  TROUPE_CHECK(cfg_.val_fraction == 0.0 || val_.total > 0, errc::invalid_argument,
               "packed_dataset: val_fraction {} holds out too few tokens for one sequence of seq_len + 1 = {} tokens "
               "per val chunk ({} tokens, {} val_chunks); raise val_fraction, lower val_chunks or seq_len",
               cfg_.val_fraction, T + 1, N, cfg_.val_chunks);
}

void packed_dataset::add_range(split_part& p, int64_t begin, int64_t end) const {
  const int64_t n = end - begin > cfg_.seq_len ? (end - begin - 1) / cfg_.seq_len : 0;
  if (n == 0) return;
  p.ranges.emplace_back(begin, end);
  p.first.push_back(p.total);
  p.total += n;
}

int64_t packed_dataset::token_offset(data_split s, int64_t i) const {
  const split_part& p = part(s);
  TROUPE_CHECK(i >= 0 && i < p.total, errc::out_of_range, "packed_dataset: {} sequence {} out of range [0, {})",
               split_name(s), i, p.total);
  const size_t r = static_cast<size_t>(std::upper_bound(p.first.begin(), p.first.end(), i) - p.first.begin()) - 1;
  return p.ranges[r].first + (i - p.first[r]) * cfg_.seq_len;
}

void packed_dataset::sequence(data_split s, int64_t i, int32_t* inputs, int32_t* targets) const {
  const int64_t o = token_offset(s, i);
  const int64_t T = cfg_.seq_len;
  for (int64_t t = 0; t < T; ++t) {
    inputs[t] = static_cast<int32_t>(tokens_[o + t]);
    targets[t] = static_cast<int32_t>(tokens_[o + t + 1]);
  }
}

std::vector<int64_t> packed_epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  std::mt19937_64 rng(splitmix64(seed ^ splitmix64(static_cast<uint64_t>(epoch))));
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(uniform_below(rng, static_cast<uint64_t>(i) + 1));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

batch_iterator::batch_iterator(packed_dataset ds, data_split split, batch_layout layout, uint64_t seed, bool shuffle,
                               data_position start)
    : ds_(std::move(ds)),
      split_(split),
      layout_(layout),
      seed_(seed),
      shuffle_(shuffle),
      n_(ds_.num_sequences(split)),
      pos_(start) {
  TROUPE_CHECK(layout_.micro_batch > 0, errc::invalid_argument, "batch_iterator: micro_batch must be positive, got {}",
               layout_.micro_batch);
  TROUPE_CHECK(layout_.dp > 0 && layout_.rank >= 0 && layout_.rank < layout_.dp, errc::invalid_argument,
               "batch_iterator: rank {} is not in [0, dp = {})", layout_.rank, layout_.dp);
  TROUPE_CHECK(n_ > 0, errc::invalid_argument, "batch_iterator: the {} split has no sequences", split_name(split));
  TROUPE_CHECK(pos_.epoch >= 0 && pos_.index >= 0 && pos_.index < n_, errc::out_of_range,
               "batch_iterator: position (epoch {}, index {}) is outside the {} split's {} sequences per epoch; the "
               "checkpoint was saved with different data or seq_len",
               pos_.epoch, pos_.index, split_name(split), n_);
}

int64_t batch_iterator::sequence_at(int64_t epoch, int64_t index) const {
  if (!shuffle_) return index;
  auto it = orders_.find(epoch);
  if (it == orders_.end()) {
    if (orders_.size() >= 2) orders_.erase(orders_.begin());  // iterators move forward: drop the oldest
    it = orders_.emplace(epoch, packed_epoch_order(n_, seed_, epoch)).first;
  }
  return it->second[static_cast<size_t>(index)];
}

std::vector<int64_t> batch_iterator::peek_indices() const {
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(layout_.micro_batch));
  // Global offset of this rank's first sequence, relative to pos_; epochs wrap.
  int64_t epoch = pos_.epoch;
  int64_t index = pos_.index + layout_.rank * layout_.micro_batch;
  for (int64_t k = 0; k < layout_.micro_batch; ++k, ++index) {
    epoch += index / n_;
    index %= n_;
    out.push_back(sequence_at(epoch, index));
  }
  return out;
}

void batch_iterator::next(int32_t* inputs, int32_t* targets) {
  const int64_t T = ds_.seq_len();
  const std::vector<int64_t> idx = peek_indices();
  for (size_t k = 0; k < idx.size(); ++k)
    ds_.sequence(split_, idx[k], inputs + static_cast<int64_t>(k) * T, targets + static_cast<int64_t>(k) * T);
  const int64_t step = static_cast<int64_t>(layout_.dp) * layout_.micro_batch;
  pos_.index += step;
  pos_.epoch += pos_.index / n_;
  pos_.index %= n_;
}

}  // namespace troupe::parallel
