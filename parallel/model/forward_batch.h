// parallel/model/forward_batch.h — one forward of the decoder over MANY sequences at once, each
// bringing its own new tokens (a prefill chunk of any length, or one decode token) at its own
// positions, against a block-paged KV cache: the model step of continuous batching.
//
//   paged_kv_store kv(dec.config(), /*num_blocks=*/256, /*block_size=*/16);
//   std::vector<int32_t> a_ids = {...}, a_tab = {7, 3}, b_ids = {next_b}, b_tab = {12, 0, 5};
//   std::vector<forward_batch_seq> batch = {
//       {.tokens = a_ids, .start = 0, .block_table = a_tab},    // prefill (chunk)
//       {.tokens = b_ids, .start = 40, .block_table = b_tab}};  // decode at position 40
//   tensor logits = forward_batch(dec, batch, kv);              // (2, V): each one's last token
//
// Invariants:
//   1. Sequence i's tokens sit at positions [start_i, start_i + n_i); start_i tokens of it are
//      already in the cache (written by earlier calls, or shared prefix blocks). Position p of
//      sequence i lives in block block_table_i[p / block_size], row p % block_size.
//   2. Each layer writes the K/V (RoPE applied) of every new token to its slot before the
//      attention reads, so a prefill chunk attends causally to itself and its prefix.
//   3. The logits of a sequence's new tokens equal decoder::forward_logits over its whole
//      prefix at those positions (fp32 rounding aside), whatever else shares the batch.
//   4. MoE layers run through decoder::expert_parallelism() when set (moe_runner::forward over
//      all Nq new tokens at once, like layer_forward), else moe_forward on this rank.
//   5. Every input is checked before anything is written: a rejected batch leaves the store as it
//      was. Errors name the sequence: errc::invalid_argument for no tokens, a negative start, a
//      position >= max_position_embeddings, a block table too short for the positions or with a
//      block id outside the store, two tokens writing the same slot, or a store of another model;
//      errc::out_of_range for a token id outside the vocabulary; errc::unsupported under context
//      parallelism.
//   6. The caller (the block manager) guarantees that the slots written are not read as a
//      prefix by other sequences (shared prefix blocks are full and read-only).
#pragma once
#include <cstdint>
#include <span>

#include "parallel/model/decoder.h"
#include "parallel/model/paged_kv.h"

namespace troupe::parallel {

// One sequence of a batch; the spans are read during the call only.
struct forward_batch_seq {
  std::span<const int32_t> tokens;       // (n) new token ids, n >= 1
  int64_t start = 0;                     // tokens already in the cache = position of tokens[0]
  std::span<const int32_t> block_table;  // block ids covering positions [0, start + n)
  bool all_logits = false;               // the logits of every new token, not only the last (prompt logprobs)
};

struct forward_batch_options {
  bool all_logits = false;  // true: logits of every new token (Nq, V), in batch order
  bool no_logits = false;   // true: only the KV cache is written; an undefined tensor is returned
                            // (the other ranks of an expert-parallel serving group)
};

// -> logits: (R, V): per sequence the row of its last new token, or a row per new token for a
//    sequence with all_logits (in batch order); (Nq, V) with opt.all_logits (Nq = sum of n,
//    sequence 0's tokens first); nothing with opt.no_logits
runtime::tensor forward_batch(const decoder& dec, std::span<const forward_batch_seq> seqs, paged_kv_store& kv,
                              const forward_batch_options& opt = {});

// A group iteration without tokens on this rank (data-parallel attention, ep_serve_runner.h): every
// MoE layer's runner is called in layer order with 0 rows, so the rank takes part in the layers'
// collectives (it still computes the rows other ranks send to its experts). Nothing without an
// expert-parallel runner.
void forward_batch_idle(const decoder& dec);

// The checks of invariant 5 alone (forward_batch runs them first): throws what it would throw for
// this batch, touches nothing. An expert-parallel group checks on rank 0 before sending a step.
void check_forward_batch(const decoder& dec, std::span<const forward_batch_seq> seqs, const paged_kv_store& kv);

}  // namespace troupe::parallel
