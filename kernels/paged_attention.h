// kernels/paged_attention.h — causal grouped-query attention of a flattened batch of query
// tokens from many sequences against a block-paged KV cache (vLLM's PagedAttention), with an
// online softmax in fp32: the kernel under continuous batching, where one forward mixes
// prefill chunks and decode tokens of sequences of different lengths.
//
//   paged_attention_dims d{.Nq = 3, .NH = 8, .NKV = 2, .HD = 64, .n_seqs = 2,
//                          .num_blocks = 1024, .block_size = 16, .table_stride = 4};
//   int32_t tables[2 * 4] = {7, 3, -1, -1,  12, 0, 5, -1};   // (n_seqs, table_stride)
//   int32_t seq[3] = {0, 1, 1};  int64_t pos[3] = {20, 40, 41};  // token -> (sequence, position)
//   cpu::paged_attention_forward(out, nullptr, q, k_cache, v_cache, tables, seq, pos, d);
//
// Invariants:
//   1. Layouts: q, out: (Nq, NH, HD) token-major; k_cache, v_cache: (num_blocks, block_size,
//      NKV, HD); block_tables: (n_seqs, table_stride) int32; token_seq (Nq) int32 in
//      [0, n_seqs); token_pos (Nq) int64 >= 0; lse: (Nq, NH).
//   2. The key at position j of sequence s lives in block block_tables[s, j / block_size] at
//      row j % block_size. A query of sequence s at position p attends to the keys of s at
//      positions 0..p (causal); with window > 0 only to those > p - window (Mistral sliding
//      window, as kernels/attention.h). Table entries past p / block_size are not read
//      (padding, e.g. -1, is fine).
//   3. Every key a query reads must already be in the cache: the caller writes the K/V of
//      this batch's new tokens first, so queries of one prefill chunk see each other.
//   4. Query head h reads KV head h / (NH / NKV). NH % NKV == 0. scale 0 = 1/sqrt(HD).
//   5. The softmax is online over the key blocks, in fp32. Each (token, head) row has one owner
//      and one fixed operation order (per visible block: the scores, the running max and sum,
//      the rescale, P @ V), so results do not depend on the thread count, on the tiling, nor on
//      the other tokens of the batch: every query_tile gives bitwise the same output.
//   7. Tiling (query_tile > 0): an OpenMP item is up to query_tile consecutive positions of one
//      sequence times the NH / NKV query heads of one KV head; each key block is read once per
//      item and used by all its rows while in L1 (GQA heads share their K/V loads). query_tile 0
//      is the untiled path: one (token, head) per item, each streaming its keys alone.
//   6. Bad metadata (a sequence index, a negative position, a table too short for a position,
//      a block id outside [0, num_blocks)) throws errc::invalid_argument before anything is
//      written, naming the query token and its sequence.
#pragma once
#include <cstdint>

namespace troupe::kernels {

struct paged_attention_dims {
  int64_t Nq = 1, NH = 1, NKV = 1, HD = 1;  // query tokens, heads, kv heads, head dim
  int64_t n_seqs = 1;                       // rows of the block table
  int64_t num_blocks = 1, block_size = 16;  // cache blocks and tokens per block
  int64_t table_stride = 1;                 // block-table row length (max blocks per sequence)
  float scale = 0.0f;                       // 0 = 1/sqrt(HD)
  int64_t window = 0;                       // 0 = full causal
  int64_t query_tile = 16;                  // invariant 7; 0 = one (token, head) per item
};

namespace cpu {
// q: (Nq, NH, HD), k_cache, v_cache: (num_blocks, block_size, NKV, HD),
// block_tables: (n_seqs, table_stride), token_seq: (Nq), token_pos: (Nq)
//   ->  out: (Nq, NH, HD), lse: (Nq, NH) nullable
void paged_attention_forward(float* out, float* lse, const float* q, const float* k_cache, const float* v_cache,
                             const int32_t* block_tables, const int32_t* token_seq, const int64_t* token_pos,
                             const paged_attention_dims& d);
}  // namespace cpu
}  // namespace troupe::kernels
