// bench/paged_attention_bench.cpp — the paged attention kernel (kernels/paged_attention.h) tiled
// (query_tile 16: a tile of consecutive queries x the query heads of one KV head reads each key
// block once) against its untiled path (query_tile 0: one (token, head) per item, each streaming
// its keys alone), on the batch shapes of serving, in one run. Both outputs are compared bitwise.
//
//   build/bench/paged_attention_bench --threads 1 [--reps 5] [--quick]
//
// Shapes (blocks of 16 tokens, block tables shuffled over the cache):
//   prefill  one sequence's 512-token chunk at positions [1536, 2048)
//   decode   64 sequences, one token each, at positions 1000..1063
//   mixed    a 256-token chunk at [768, 1024) plus 32 decode tokens at 1000..1031
// for the heads of troupe's tiny-mixtral (8 query heads over 2 KV heads, head dim 16) and of a
// Llama-3-8B layer (32 over 8, head dim 128).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/paged_attention.h"
#include "runtime/threads.h"

using namespace troupe;
using namespace troupe::bench;

namespace {

struct shape {
  std::string name;
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (first position, tokens) per sequence
};

struct heads {
  std::string name;
  int64_t NH, NKV, HD;
};

struct problem {
  kernels::paged_attention_dims d;
  std::vector<float> q, k, v;
  std::vector<int32_t> tables, seq;
  std::vector<int64_t> pos;
};

problem make(const shape& s, const heads& h) {
  problem p;
  auto& d = p.d;
  d.NH = h.NH, d.NKV = h.NKV, d.HD = h.HD, d.block_size = 16;
  d.n_seqs = static_cast<int64_t>(s.chunks.size());
  int64_t longest = 0;
  for (const auto& [start, n] : s.chunks) longest = std::max(longest, start + n);
  d.table_stride = (longest + d.block_size - 1) / d.block_size;
  d.num_blocks = d.n_seqs * d.table_stride;
  std::vector<int32_t> pool(static_cast<size_t>(d.num_blocks));
  std::iota(pool.begin(), pool.end(), 0);
  std::mt19937 rng(7);
  std::shuffle(pool.begin(), pool.end(), rng);
  p.tables = pool;  // every row its own table_stride blocks
  for (int64_t sq = 0; sq < d.n_seqs; ++sq)
    for (int64_t t = 0; t < s.chunks[static_cast<size_t>(sq)].second; ++t)
      p.seq.push_back(static_cast<int32_t>(sq)), p.pos.push_back(s.chunks[static_cast<size_t>(sq)].first + t);
  d.Nq = static_cast<int64_t>(p.seq.size());
  std::normal_distribution<float> n01(0.0f, 1.0f);
  p.q.resize(static_cast<size_t>(d.Nq * d.NH * d.HD));
  p.k.resize(static_cast<size_t>(d.num_blocks * d.block_size * d.NKV * d.HD));
  p.v.resize(p.k.size());
  for (auto& x : p.q) x = n01(rng);
  for (auto& x : p.k) x = n01(rng);
  for (auto& x : p.v) x = n01(rng);
  return p;
}

double time_it(const problem& p, int64_t tile, int reps, std::vector<float>& out) {
  kernels::paged_attention_dims d = p.d;
  d.query_tile = tile;
  std::vector<double> t;
  for (int r = 0; r < reps + 1; ++r) {
    const auto t0 = clk::now();
    kernels::cpu::paged_attention_forward(out.data(), nullptr, p.q.data(), p.k.data(), p.v.data(), p.tables.data(),
                                          p.seq.data(), p.pos.data(), d);
    if (r > 0) t.push_back(seconds_since(t0));  // the first run warms the caches
  }
  return median(t);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"paged attention: tiled vs untiled"};
  int threads = 1, reps = 5;
  bool quick = false;
  app.add_option("--threads", threads, "OpenMP threads");
  app.add_option("--reps", reps, "timed repetitions (median)");
  app.add_flag("--quick", quick, "small shapes, 1 repetition (a smoke run: checks the outputs only)");
  CLI11_PARSE(app, argc, argv);
  runtime::set_num_threads(threads);
  std::vector<shape> shapes = {{"prefill", {{1536, 512}}},
                               {"decode", {}},
                               {"mixed", {{768, 256}}}};
  for (int64_t i = 0; i < 64; ++i) shapes[1].chunks.emplace_back(1000 + i, 1);
  for (int64_t i = 0; i < 32; ++i) shapes[2].chunks.emplace_back(1000 + i, 1);
  std::vector<heads> hs = {{"tiny-mixtral 8/2 x 16", 8, 2, 16}, {"llama-3-8b 32/8 x 128", 32, 8, 128}};
  if (quick) {
    shapes = {{"prefill", {{40, 24}}}, {"decode", {{30, 1}, {50, 1}, {7, 1}}}, {"mixed", {{16, 20}, {33, 1}}}};
    reps = 1;
  }
  fmt::print("| heads | shape | queries | untiled ms | tiled (16) ms | untiled / tiled |\n");
  fmt::print("|---|---|---:|---:|---:|---:|\n");
  bool same = true;
  for (const auto& h : hs)
    for (const auto& s : shapes) {
      const problem p = make(s, h);
      std::vector<float> a(p.q.size()), b(p.q.size());
      const double t0 = time_it(p, 0, reps, a), t16 = time_it(p, 16, reps, b);
      const bool eq = std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
      same &= eq;
      fmt::print("| {} | {} | {} | {:.3f} | {:.3f} | {:.2f}x{} |\n", h.name, s.name, p.d.Nq, t0 * 1e3, t16 * 1e3,
                 t0 / t16, eq ? "" : " (OUTPUTS DIFFER)");
    }
  fmt::print("\n{} thread(s), median of {} after a warm-up, load average {}; outputs {}\n", threads, reps, loadavg(),
             same ? "bitwise equal" : "DIFFER");
  return same ? 0 : 1;
}
