// tests/unit/serve_group_util.h — in-process serving groups for the tests: a fixture's path, prompt
// ids, one rank's model (its shard of the experts behind the LLEP layer), P ranks on threads, and
// generate_greedy's new tokens as the reference.
//
//   auto tok = runtime::make_inproc_group(P, 30000), wts = runtime::make_inproc_group(P, 30000);
//   run_ranks(P, tok, &wts, [&](int r) { rank_model m("mixtral_moe", r, P, tok[r].get(), wts[r].get()); ... });
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "parallel/ep/ep_serve_runner.h"
#include "parallel/ep/ep_shard.h"
#include "parallel/model/generate.h"
#include "parallel/model/model_weights.h"
#include "runtime/communicator.h"

namespace troupe_test {

using namespace troupe;
using parallel::ep::ep_context;
using parallel::ep::ep_placement;
using parallel::ep::ep_serve_layout;
using parallel::ep::ep_serve_runner;

inline std::string fixture(const std::string& name) { return std::string(TROUPE_FIXTURES_DIR) + "/" + name; }

inline std::vector<int32_t> ids(int64_t n, int32_t seed, int64_t vocab) {
  std::vector<int32_t> p;
  for (int64_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((seed * 31 + i * 17 + i * i) % vocab));
  return p;
}

// One rank of a serving group: its shard of the experts (contiguous placement), the LLEP layer.
struct rank_model {
  parallel::model_weights w;
  std::unique_ptr<ep_serve_runner> runner;
  std::unique_ptr<parallel::decoder> dec;
  rank_model(const std::string& model, int r, int P, runtime::communicator* tok, runtime::communicator* wts,
             ep_serve_layout layout = ep_serve_layout::replicated) {
    w = parallel::model_weights::load(fixture(model));
    const ep_placement pl = ep_placement::contiguous(w.config().n_experts, P);
    parallel::ep::ep_shard_weights(w, pl, r);
    ep_context ctx;
    ctx.tokens = tok;
    ctx.weights = wts;
    ctx.placement = pl;
    ctx.options.mode = parallel::ep::ep_mode::llep;
    ctx.options.llep.lambda = 1.0;  // always plan with LLEP (spills whenever a rank is above the mean)
    runner = std::make_unique<ep_serve_runner>(ctx, layout);
    dec = std::make_unique<parallel::decoder>(w);
    dec->set_expert_parallel(runner.get());
  }
};

// Runs fn(rank) on P threads; a rank that throws aborts the group's communicators (so the others
// do not wait for it) and its message is returned ("" for the ranks that did not throw).
inline std::vector<std::string> run_ranks(int P, const std::vector<std::unique_ptr<runtime::communicator>>& tok,
                                   const std::vector<std::unique_ptr<runtime::communicator>>* wts,
                                   const std::function<void(int)>& fn) {
  std::vector<std::string> errors(static_cast<size_t>(P));
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      const auto rr = static_cast<size_t>(r);
      try {
        fn(r);
      } catch (const std::exception& e) {
        errors[rr] = e.what();
        tok[rr]->abort(e.what());
        if (wts) (*wts)[rr]->abort(e.what());
      }
    });
  for (auto& t : th) t.join();
  return errors;
}

inline std::vector<int32_t> greedy_tail(const parallel::decoder& dec, const std::vector<int32_t>& prompt, int64_t n) {
  parallel::generate_options o;
  o.max_new_tokens = n;
  const auto r = parallel::generate_greedy(dec, prompt, 1, static_cast<int64_t>(prompt.size()), o);
  return std::vector<int32_t>(r.ids.begin() + static_cast<int64_t>(prompt.size()), r.ids.end());
}

}  // namespace troupe_test
