// parallel/data/packed_dataset.h — fixed-length training sequences packed from a token stream,
// a held-out validation split, a seeded per-epoch shuffle and a data-parallel batch iterator.
//
//   packed_dataset ds(token_file::open("train.bin").tokens(), {.seq_len = 256, .val_fraction = 0.1});
//   batch_iterator it(ds, data_split::train, {.micro_batch = 4, .dp = 2, .rank = r}, /*seed=*/1337);
//   it.next(inputs, targets);              // inputs, targets: (micro_batch, seq_len) int32
//   data_position p = it.position();       // save with the checkpoint ...
//   batch_iterator again(ds, data_split::train, layout, 1337, true, p);  // ... and resume exactly
//
// Invariants:
//   1. Splits: the stream is cut into val_chunks equal contiguous regions; the last
//      round(val_fraction * region) tokens of each region are validation, the rest train.
//      No token belongs to both. Deterministic: depends only on the token count and config.
//   2. Sequences: inside each split range [b, e), sequence k is tokens [b + k*T, b + k*T + T + 1)
//      (llm.c's stride T: consecutive sequences share one boundary token, so every token of
//      [b, b + n*T) is an input exactly once and targets are inputs shifted by one). Documents
//      are already separated by EOS in the stream (see byte_tokenize_documents / llm.c's EOT).
//   3. Order: epoch e of the train split visits every sequence exactly once, in a Fisher-Yates
//      permutation drawn from std::mt19937_64 seeded by (seed, e) with troupe's own bounded draw,
//      so the order is the same on every platform and standard library. Val is never shuffled.
//   4. Batches: the split's epochs are one endless stream of sequences; the global micro step
//      at position p takes the next dp * micro_batch of them and rank r gets the r-th block of
//      micro_batch. Ranks are disjoint, and dp ranks together read exactly what one rank with
//      micro_batch * dp reads. A global batch of G sequences is G / (dp * micro_batch)
//      consecutive micro steps. A micro step may cross an epoch boundary; nothing is dropped.
//   5. position() = (epoch, index of the next sequence in that epoch's order) is the whole
//      iterator state: an iterator made at a saved position yields exactly the batches the
//      original would have yielded next.
#pragma once
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "parallel/data/token_file.h"

namespace troupe::parallel {

enum class data_split { train, val };

struct packed_config {
  int64_t seq_len = 0;        // T: a sequence holds T + 1 tokens (T inputs, T targets)
  double val_fraction = 0.1;  // share of the tokens held out, in [0, 1)
  int64_t val_chunks = 1;     // regions the stream is cut into; each gives its tail to val
};

struct data_position {
  int64_t epoch = 0;
  int64_t index = 0;  // next sequence within the epoch's order, in [0, num_sequences)
  bool operator==(const data_position&) const = default;
};

struct batch_layout {
  int64_t micro_batch = 1;  // sequences per rank per micro step
  int dp = 1;               // data-parallel ranks
  int rank = 0;             // this rank, in [0, dp)
};

class packed_dataset {
 public:
  packed_dataset(token_span tokens, packed_config cfg);

  int64_t seq_len() const { return cfg_.seq_len; }
  int64_t num_tokens() const { return tokens_.size; }
  int64_t num_sequences(data_split s) const { return part(s).total; }
  // Token ranges [begin, end) of the stream that form a split.
  const std::vector<std::pair<int64_t, int64_t>>& ranges(data_split s) const { return part(s).ranges; }
  // Stream offset of sequence i's first token.
  int64_t token_offset(data_split s, int64_t i) const;
  // inputs[t] = tok[o + t], targets[t] = tok[o + t + 1] for t < T, o = token_offset(s, i).
  void sequence(data_split s, int64_t i, int32_t* inputs, int32_t* targets) const;

 private:
  struct split_part {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    std::vector<int64_t> first;  // first sequence index of each range (prefix sums)
    int64_t total = 0;
  };
  const split_part& part(data_split s) const { return s == data_split::train ? train_ : val_; }
  void add_range(split_part& p, int64_t begin, int64_t end) const;

  token_span tokens_;
  packed_config cfg_;
  split_part train_, val_;
};

// The order of sequences 0..n-1 in an epoch: a seeded Fisher-Yates permutation.
std::vector<int64_t> packed_epoch_order(int64_t n, uint64_t seed, int64_t epoch);

class batch_iterator {
 public:
  // shuffle: use packed_epoch_order (the default for train); otherwise 0..n-1 every epoch.
  batch_iterator(packed_dataset ds, data_split split, batch_layout layout, uint64_t seed, bool shuffle = true,
                 data_position start = {});

  // This rank's next micro batch: inputs, targets (micro_batch, seq_len). Advances by dp * micro_batch.
  void next(int32_t* inputs, int32_t* targets);
  // The sequence indices next() would read, without advancing.
  std::vector<int64_t> peek_indices() const;
  data_position position() const { return pos_; }
  int64_t sequences_per_epoch() const { return n_; }

 private:
  int64_t sequence_at(int64_t epoch, int64_t index) const;

  packed_dataset ds_;
  data_split split_;
  batch_layout layout_;
  uint64_t seed_;
  bool shuffle_;
  int64_t n_;
  data_position pos_;
  mutable std::map<int64_t, std::vector<int64_t>> orders_;  // cached epoch orders (at most two)
};

}  // namespace troupe::parallel
