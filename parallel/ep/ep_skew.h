// parallel/ep/ep_skew.h — synthetic top-k routing with a controlled skew, for the LLEP benchmarks
// and tests (the cases of ../shared/ALGORITHMS.md, LLEP: "x% of the tokens into h experts").
//
//   skew_case c = skew_case_from("80%-4");                 // or skew_cases_standard()
//   std::vector<int32_t> topk = skew_routing(c, /*N=*/65536, /*K=*/4, /*E=*/128, {.seed = 7});
//   std::vector<int64_t> loads = loads_from_routing(topk.data(), 65536, 4, 128);
//   ep_plan ll = llep_plan(loads, ep_placement::contiguous(128, 8), {});
//   skew_expected_loads(c, 65536, 4, 128, {});             // what the loads approach as N grows
//
// Invariants:
//   1. A case is (f, h): hot fraction f in [0, 1] and hot set size h in [0, E]; "balanced" is
//      (0, 0). Names: "balanced" or "<percent>%-<h>" ("30%-16", "95%-1", "12.5%-8").
//   2. Hot set: `first` = experts 0 .. h-1 (all on rank 0 under contiguous placement when
//      h <= E/P: the worst case); `spread` = hot expert j is expert (j % P) * (E/P) + j / P,
//      round-robin over the ranks of ep_placement::contiguous(E, P).
//   3. Each token independently is hot with probability f. A hot token picks min(K, h) distinct
//      experts uniformly from the hot set, then K - min(K, h) distinct ones uniformly from the cold
//      set (the other E - h experts); a cold token picks K distinct experts uniformly from the cold
//      set (from all E experts when h = 0). Row n of the result is token n's K ids, hot ones
//      first, each group in random order. So every row holds K distinct ids in [0, E).
//   4. Expected loads (skew_expected_loads): a hot expert gets N f min(K, h) / h rows, a cold one
//      N (f (K - min(K, h)) + (1 - f) K) / (E - h); they sum to N K.
//   5. Deterministic and portable: one std::mt19937_64 seeded with `seed`, consumed in token
//      order; bounded integers and Bernoulli draws are computed here (not by <random>'s
//      distributions, whose outputs differ between standard libraries).
//   6. Impossible requests (K > E, too few cold experts for a token's cold picks, f > 0 with
//      h = 0, spread with E not a multiple of P) throw errc::invalid_argument naming the values.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace troupe::parallel::ep {

struct skew_case {
  std::string name;         // canonical: "balanced" or "<percent>%-<h>"
  double hot_fraction = 0;  // f: probability that a token is hot
  int64_t hot_experts = 0;  // h: size of the hot set (0: balanced)
};

enum class skew_hot_placement { first, spread };

struct skew_options {
  skew_hot_placement placement = skew_hot_placement::first;
  int ranks = 1;      // P, for `spread`
  uint64_t seed = 1;
};

// "balanced" or "<percent>%-<h>"; throws errc::invalid_argument on anything else.
skew_case skew_case_from(const std::string& name);
// The cases, in order: balanced, 30%-16, 50%-4, 80%-4, 95%-1.
std::vector<skew_case> skew_cases_standard();

// The hot expert ids (invariant 2), ascending.
std::vector<int> skew_hot_set(const skew_case& c, int64_t experts, const skew_options& o);

// -> topk: (N, K) int32, row n = token n's K distinct experts (invariant 3)
std::vector<int32_t> skew_routing(const skew_case& c, int64_t N, int64_t K, int64_t experts, const skew_options& o);

// topk: (N, K) ids in [0, E)  ->  rows per expert (E); an id outside [0, E) throws errc::out_of_range.
std::vector<int64_t> loads_from_routing(const int32_t* topk, int64_t N, int64_t K, int64_t experts);

// The mean of loads_from_routing(skew_routing(...)) over seeds (invariant 4), per expert.
std::vector<double> skew_expected_loads(const skew_case& c, int64_t N, int64_t K, int64_t experts,
                                        const skew_options& o);

}  // namespace troupe::parallel::ep
