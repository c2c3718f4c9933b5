// elastic/scale/dp_group.cpp — see dp_group.h.
#include "elastic/scale/dp_group.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <nlohmann/json.hpp>

#include "elastic/engine/guided_json.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::elastic {

namespace log = runtime::log;
using clk = std::chrono::steady_clock;
using runtime::errc;
using runtime::tensor;

namespace {

constexpr int64_t kind_end = 0, kind_step = 1, kind_idle = 2, kind_sync = 3, kind_prepare = 4, kind_commit = 5;
constexpr int tag_report = 20101;  // rank r -> 0: its DpReport of an iteration
constexpr int tag_recover = 20115;  // dp_elastic::control: rank 0 -> a survivor its recovery DpScale; back, a DpResync
constexpr int loss_wait_ms = 2000;  // a failed step waits this long for a loss to be named (invariant 8): a
                                    // killed peer can fail a transfer before the supervisor names it

// ---- the wire ------------------------------------------------------------------------------------

void encode_params(const sampling_params& p, serve::DpSampling* d) {
  d->set_temperature(p.temperature);
  d->set_top_k(p.top_k);
  d->set_top_p(p.top_p);
  d->set_min_p(p.min_p);
  d->set_seed(p.seed);
  d->set_max_tokens(p.max_tokens);
  d->set_min_tokens(p.min_tokens);
  for (const auto& s : p.stop) d->add_stop(s);
  for (int32_t t : p.stop_token_ids) d->add_stop_token_ids(t);
  d->set_ignore_eos(p.ignore_eos);
  d->set_presence_penalty(p.presence_penalty);
  d->set_frequency_penalty(p.frequency_penalty);
  d->set_repetition_penalty(p.repetition_penalty);
  for (const auto& [id, b] : p.logit_bias) {
    d->add_bias_ids(id);
    d->add_bias_values(b);
  }
  d->set_logprobs(p.logprobs);
  d->set_prompt_logprobs(p.prompt_logprobs);
  d->set_grammar(p.grammar_source);
}

// The grammar a rank compiles again from its source (the same text compiles once per rank).
std::shared_ptr<const json_grammar> grammar_of(const std::string& source,
                                               std::map<std::string, std::shared_ptr<const json_grammar>>& cache) {
  if (source.empty()) return nullptr;
  auto it = cache.find(source);
  if (it != cache.end()) return it->second;
  std::shared_ptr<const json_grammar> g;
  if (source == "json_object") g = json_grammar::any_object();
  else if (source.rfind("json_schema:", 0) == 0) g = json_grammar::from_schema(nlohmann::json::parse(source.substr(12)));
  else TROUPE_THROW(errc::invalid_argument, "serving group: unknown grammar source '{}'", source.substr(0, 40));
  if (cache.size() >= 64) cache.clear();
  return cache.emplace(source, g).first->second;
}

sampling_params decode_params(const serve::DpSampling& d,
                              std::map<std::string, std::shared_ptr<const json_grammar>>& grammars) {
  sampling_params p;
  p.temperature = d.temperature();
  p.top_k = d.top_k();
  p.top_p = d.top_p();
  p.min_p = d.min_p();
  p.seed = d.seed();
  p.max_tokens = d.max_tokens();
  p.min_tokens = d.min_tokens();
  p.stop.assign(d.stop().begin(), d.stop().end());
  p.stop_token_ids.assign(d.stop_token_ids().begin(), d.stop_token_ids().end());
  p.ignore_eos = d.ignore_eos();
  p.presence_penalty = d.presence_penalty();
  p.frequency_penalty = d.frequency_penalty();
  p.repetition_penalty = d.repetition_penalty();
  for (int i = 0; i < d.bias_ids_size() && i < d.bias_values_size(); ++i)
    p.logit_bias.emplace_back(d.bias_ids(i), d.bias_values(i));
  p.logprobs = d.logprobs();
  p.prompt_logprobs = d.prompt_logprobs();
  p.grammar_source = d.grammar();
  p.grammar = grammar_of(p.grammar_source, grammars);
  return p;
}

void encode_logprob(const token_logprob& t, serve::DpLogprob* d) {
  d->set_id(t.id);
  d->set_logprob(t.logprob);
  for (const auto& [id, lp] : t.top) {
    d->add_top_ids(id);
    d->add_top_logprobs(lp);
  }
}

token_logprob decode_logprob(const serve::DpLogprob& d) {
  token_logprob t;
  t.id = d.id();
  t.logprob = d.logprob();
  for (int i = 0; i < d.top_ids_size() && i < d.top_logprobs_size(); ++i) t.top.emplace_back(d.top_ids(i), d.top_logprobs(i));
  return t;
}

void encode_event(const std::string& id, const engine_event& e, serve::DpEvent* d) {
  d->set_id(id);
  d->set_index(e.index);
  d->set_text(e.text);
  for (int32_t t : e.token_ids) d->add_token_ids(t);
  for (const auto& t : e.logprobs) encode_logprob(t, d->add_logprobs());
  for (const auto& t : e.prompt_logprobs) encode_logprob(t, d->add_prompt_logprobs());
  d->set_finished(e.finished);
  d->set_finish_reason(e.finish_reason);
  d->set_error(e.error);
  d->set_prompt_tokens(e.prompt_tokens);
  d->set_completion_tokens(e.completion_tokens);
  d->set_cumulative_logprob(e.cumulative_logprob);
}

// A DpRequest as this rank's engine request (its events go to on_event).
engine_request request_of(const serve::DpRequest& q, std::map<std::string, std::shared_ptr<const json_grammar>>& grammars,
                          clk::time_point now) {
  engine_request r;
  r.id = q.id();
  r.prompt.assign(q.prompt().begin(), q.prompt().end());
  r.params = decode_params(q.params(), grammars);
  r.n = std::max<int64_t>(q.n(), 1);
  r.cumulative_logprob = q.cumulative_logprob();
  r.arrival = now - std::chrono::microseconds(q.waited_us());
  if (q.resumed()) {
    engine_request::resumed from;
    from.index = q.resume_index();
    from.tokens.assign(q.resume_tokens().begin(), q.resume_tokens().end());
    from.cumulative_logprob = q.resume_cumulative_logprob();
    from.prompt_logprobs_sent = q.resume_prompt_logprobs_sent();
    from.last_token_age = std::chrono::microseconds(q.resume_last_token_us());
    r.resume = std::move(from);
  }
  return r;
}

engine_event decode_event(const serve::DpEvent& d) {
  engine_event e;
  e.index = d.index();
  e.text = d.text();
  e.token_ids.assign(d.token_ids().begin(), d.token_ids().end());
  for (const auto& t : d.logprobs()) e.logprobs.push_back(decode_logprob(t));
  for (const auto& t : d.prompt_logprobs()) e.prompt_logprobs.push_back(decode_logprob(t));
  e.finished = d.finished();
  e.finish_reason = d.finish_reason();
  e.error = d.error();
  e.prompt_tokens = d.prompt_tokens();
  e.completion_tokens = d.completion_tokens();
  e.cumulative_logprob = d.cumulative_logprob();
  return e;
}

tensor bytes_tensor(const std::string& s) {
  tensor t = tensor::empty({std::max<int64_t>(static_cast<int64_t>(s.size()), 1)}, runtime::dtype::u8);
  if (!s.empty()) std::memcpy(t.data<uint8_t>(), s.data(), s.size());
  return t;
}

std::string tensor_bytes(const tensor& t, int64_t n) {
  return std::string(reinterpret_cast<const char*>(t.data<uint8_t>()), static_cast<size_t>(n));
}

int64_t blocks_of(int64_t tokens, int64_t block_size) { return (tokens + block_size - 1) / block_size; }

void fill_load(const engine& eng, serve::DpReport& r) {
  const engine_stats st = eng.stats();
  r.set_blocks_used(st.kv.blocks_used);
  r.set_num_blocks(st.kv.num_blocks);
  r.set_running(st.running);
  r.set_waiting(st.waiting);
  r.set_waiting_tokens(st.waiting_tokens);
  r.set_generated_tokens(st.generated_tokens);
  r.set_preemptions(st.preemptions);
  r.set_prefix_lookup_tokens(st.kv.prefix_lookup_tokens);
  r.set_prefix_hit_tokens(st.kv.prefix_hit_tokens);
  r.set_prompt_tokens(st.prompt_tokens);
  const latency_histogram ttft = eng.ttft_histogram(), tpot = eng.tpot_histogram();
  for (int64_t c : ttft.counts) r.add_ttft_counts(c);
  r.set_ttft_sum(ttft.sum);
  for (int64_t c : tpot.counts) r.add_tpot_counts(c);
  r.set_tpot_sum(tpot.sum);
}

// A rank's load for the dispatcher: blocks in use plus those its waiting prompts will take.
dp_rank_load load_of(const serve::DpReport& r, int64_t block_size) {
  dp_rank_load l;
  l.blocks_used = r.blocks_used() + blocks_of(r.waiting_tokens(), block_size);
  l.num_blocks = r.num_blocks();
  l.running = r.running();
  l.waiting = r.waiting();
  return l;
}

// a += a rank's reported histogram (the same buckets).
void merge(latency_histogram& a, const google::protobuf::RepeatedField<int64_t>& counts, double sum) {
  for (int i = 0; i < counts.size() && i < static_cast<int>(a.counts.size()); ++i) {
    a.counts[static_cast<size_t>(i)] += counts[i];
    a.n += counts[i];
  }
  a.sum += sum;
}

}  // namespace

// ---- rank 0 ----------------------------------------------------------------------------------------

bool dp_leader::request_state::remote_unfinished() const {
  for (size_t i = 0; i < rank.size(); ++i)
    if (!done[i] && rank[i] != 0) return true;
  return false;
}

dp_leader::dp_leader(engine& local, runtime::communicator& comm, std::unique_ptr<dp_dispatch_policy> policy,
                     group_hooks hooks, dp_elastic elastic)
    : eng_(local), comm_(&comm), elastic_(std::move(elastic)), policy_(std::move(policy)), hooks_(std::move(hooks)),
      loads_(static_cast<size_t>(comm.size())), pending_blocks_(static_cast<size_t>(comm.size()), 0),
      in_step_blocks_(static_cast<size_t>(comm.size()), 0), dispatched_(static_cast<size_t>(comm.size()), 0),
      reports_(static_cast<size_t>(comm.size())) {
  TROUPE_CHECK(comm.rank() == 0, errc::invalid_argument,
               "data-parallel serving group: rank 0 leads, not rank {} (the others run dp_follow)", comm.rank());
  TROUPE_CHECK(policy_ != nullptr, errc::invalid_argument, "data-parallel serving group: no dispatch policy");
  TROUPE_CHECK(local.options().group_member, errc::invalid_argument,
               "data-parallel serving group: rank 0's engine must be made with engine_options::group_member");
  TROUPE_CHECK(elastic_.pool_ranks == 0 || (elastic_.pool_ranks >= comm.size() && elastic_.prepare &&
                                              elastic_.commit && elastic_.ready),
               errc::invalid_argument,
               "data-parallel serving group: a pool of {} ranks for a group of {} (with prepare, ready and commit)",
               elastic_.pool_ranks, comm.size());
  for (auto& l : loads_) l.num_blocks = local.num_blocks();
  scale_.ranks = scale_.target = comm.size();
  scale_.pool_ranks = elastic_.pool_ranks;
}

dp_leader::~dp_leader() {
  try {
    finish();
  } catch (const std::exception& e) {
    log::warn("serving group: could not tell the other ranks to stop: {}", e.what());
  }
}

int dp_leader::ranks() const {
  std::lock_guard<std::mutex> g(mu_);
  return scale_.ranks;
}

bool dp_leader::broken() const {
  std::lock_guard<std::mutex> g(mu_);
  return !broken_.empty();
}

std::string dp_leader::broken_reason() const {
  std::lock_guard<std::mutex> g(mu_);
  return broken_;
}

void dp_leader::request_scale(int target) {
  std::lock_guard<std::mutex> g(mu_);
  if (elastic_.pool_ranks <= 0)
    throw dp_scale_refused(501, fmt::format("this server's group has a fixed size of {} rank(s): start it with more "
                                            "processes than engine.ranks (troupe-launch --max-ranks) to scale it",
                                            scale_.ranks));
  if (!broken_.empty() || shut_) throw dp_scale_refused(409, "the serving group is stopping or broken");
  if (scale_.state == "pending" || scale_.state == "moving")
    throw dp_scale_refused(409, fmt::format("a change to {} ranks is under way; wait for it (GET /admin/scale)",
                                            scale_.target));
  const int able = elastic_.pool_alive ? elastic_.pool_alive() : elastic_.pool_ranks;
  if (target < 1 || target > able)
    throw dp_scale_refused(400, fmt::format("ranks: {} is outside [1, {}] (the processes able to serve{})", target,
                                            able, elastic_.lost && !elastic_.lost().empty()
                                                      ? fmt::format(", {} lost", elastic_.lost().size())
                                                      : std::string()));
  if (target == scale_.ranks)
    throw dp_scale_refused(400, fmt::format("ranks: the group has {} ranks already", target));
  if (elastic_.check) {
    try {
      elastic_.check(target);
    } catch (const runtime::error& e) {
      throw dp_scale_refused(400, e.message());
    } catch (const std::exception& e) {
      throw dp_scale_refused(400, e.what());
    }
  }
  scale_.state = "pending";
  scale_.target = target;
  scale_.error.clear();
  scale_requested_ = clk::now();
}

dp_scale_status dp_leader::scale_status() const {
  const int alive = elastic_.pool_alive ? elastic_.pool_alive() : elastic_.pool_ranks;
  std::lock_guard<std::mutex> g(mu_);
  dp_scale_status s = scale_;
  s.pool_ranks = alive;  // a standby rank may have been lost too
  return s;
}

void dp_leader::submit(engine_request r) {
  eng_.check_request(r);  // every rank serves the same model with the same blocks (invariant 3)
  if (r.arrival == clk::time_point{}) r.arrival = clk::now();
  const int64_t bs = eng_.options().block_size;
  const int64_t prompt_blocks = blocks_of(static_cast<int64_t>(r.prompt.size()), bs);
  int rank = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    TROUPE_CHECK(broken_.empty(), errc::aborted, "serving group: broken: {}", broken_);
    TROUPE_CHECK(!shut_, errc::aborted, "serving group: request {} after the group stopped", r.id);
    const int P = scale_.ranks;
    const int64_t cap = eng_.options().max_waiting * P;
    if (samples_ + r.n > cap)
      throw engine_busy(fmt::format("{} sequences are in the group already ({} ranks x engine.max_waiting {})",
                                    samples_, P, eng_.options().max_waiting));
    TROUPE_CHECK(!requests_.count(r.id), errc::invalid_argument, "serving group: request id {} is in use", r.id);
    const engine_stats st = eng_.stats();
    loads_[0].blocks_used = st.kv.blocks_used + blocks_of(st.waiting_tokens, bs);
    loads_[0].running = st.running;
    loads_[0].waiting = st.waiting;
    for (int k = 0; k < P; ++k) loads_[static_cast<size_t>(k)].pending_blocks = pending_blocks_[static_cast<size_t>(k)];
    // A rank about to leave takes nothing new (invariant 7).
    const bool changing = scale_.state == "pending" || scale_.state == "moving";
    const int usable = changing ? std::min(P, scale_.target) : P;
    rank = policy_->pick(r.prompt, loads_);
    if (rank >= usable || (rank == 0 && P > 1 && st.waiting + r.n > eng_.options().max_waiting)) {
      // rank 0's own queue is full, or the pick leaves: the least loaded of the others instead
      int best = usable > 1 ? 1 : 0;
      for (int k = 2; k < usable; ++k)
        if (loads_[static_cast<size_t>(k)].load() < loads_[static_cast<size_t>(best)].load()) best = k;
      rank = best;
    }
    request_state s;
    s.rank.assign(static_cast<size_t>(r.n), rank);
    s.n = r.n;
    s.done.assign(static_cast<size_t>(r.n), false);
    s.on_event = std::move(r.on_event);
    if (rank != 0) {
      record_dispatch(rank, r.prompt, prompt_blocks);
      serve::DpRequest* q = next_.add_requests();
      q->set_rank(rank);
      q->set_id(r.id);
      for (int32_t t : r.prompt) q->add_prompt(t);
      encode_params(r.params, q->mutable_params());
      q->set_n(r.n);
      q->set_cumulative_logprob(r.cumulative_logprob);
      s.spec = *q;
      s.sent.resize(static_cast<size_t>(r.n));
      s.cumulative.assign(static_cast<size_t>(r.n), 0.0);
      s.last_sent.assign(static_cast<size_t>(r.n), r.arrival);
      s.arrival = r.arrival;
      arrivals_[r.id] = r.arrival;
      requests_.emplace(r.id, std::move(s));
      samples_ += r.n;
      return;
    }
    requests_.emplace(r.id, std::move(s));
    samples_ += r.n;
  }
  // Rank 0's own: its engine, the events through the same bookkeeping (finished samples).
  const std::string id = r.id;
  const std::vector<int32_t> prompt = r.prompt;
  r.on_event = [this, id](const engine_event& e) { deliver(id, e); };
  try {
    eng_.submit(std::move(r));
  } catch (...) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = requests_.find(id);
    if (it != requests_.end()) {
      samples_ -= it->second.n;
      requests_.erase(it);
    }
    throw;
  }
  std::lock_guard<std::mutex> g(mu_);
  record_dispatch(0, prompt, prompt_blocks);
}

void dp_leader::record_dispatch(int rank, const std::vector<int32_t>& prompt, int64_t blocks) {
  policy_->dispatched(rank, prompt);
  ++dispatched_[static_cast<size_t>(rank)];
  pending_blocks_[static_cast<size_t>(rank)] += blocks;
}

void dp_leader::abort(const std::string& id) {
  bool local = true;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = requests_.find(id);
    if (it != requests_.end()) {
      local = false;
      std::vector<int> told;
      for (size_t i = 0; i < it->second.rank.size(); ++i) {
        const int k = it->second.rank[i];
        if (it->second.done[i]) continue;
        if (k == 0) local = true;
        else if (std::find(told.begin(), told.end(), k) == told.end()) {
          told.push_back(k);
          serve::DpAbort* a = next_.add_aborts();
          a->set_rank(k);
          a->set_id(id);
        }
      }
    }
  }
  if (local) eng_.abort(id);
}

bool dp_leader::inbox_pending() const {
  std::lock_guard<std::mutex> g(mu_);
  if (!broken_.empty()) return false;  // nothing will be taken: no busy loop of failing steps
  return loss_pending() || eng_.inbox_pending() || next_.requests_size() > 0 || next_.aborts_size() > 0 || scale_.state == "pending" ||
         scale_.state == "moving";
}

// A sample's event to its request's callback (outside the lock); the request is forgotten once every
// sample finished. A remote sample's delivered tokens are kept (to move it, invariant 7).
void dp_leader::deliver(const std::string& id, const engine_event& e) {
  std::function<void(const engine_event&)> cb;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return;
    request_state& s = it->second;
    const auto i = static_cast<size_t>(e.index);
    if (e.index < 0 || e.index >= s.n || s.done[i]) return;
    cb = s.on_event;
    if (!s.sent.empty() && s.rank[i] != 0) {
      s.sent[i].insert(s.sent[i].end(), e.token_ids.begin(), e.token_ids.end());
      s.cumulative[i] = e.cumulative_logprob;
      if (!e.token_ids.empty()) s.last_sent[i] = clk::now();
      s.prompt_logprobs_sent |= !e.prompt_logprobs.empty();
    }
    if (e.finished) {
      s.done[i] = true;
      if (!s.sent.empty()) std::vector<int32_t>().swap(s.sent[i]);
      --samples_;
      bool all = true;
      for (bool d : s.done) all &= d;
      if (all) {
        arrivals_.erase(id);
        requests_.erase(it);
      }
    }
  }
  if (cb) cb(e);
}

// Every remote sample not finished ends with `reason` (rank 0's own end through its engine).
void dp_leader::fail_remote(const std::string& why, const std::string& reason) {
  std::vector<std::pair<std::function<void(const engine_event&)>, engine_event>> out;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = requests_.begin(); it != requests_.end();) {
      request_state& s = it->second;
      bool all = true;
      for (int64_t i = 0; i < s.n; ++i) {
        const auto k = static_cast<size_t>(i);
        if (!s.done[k] && s.rank[k] != 0) {
          s.done[k] = true;
          --samples_;
          engine_event e;
          e.index = i;
          e.finished = true;
          e.finish_reason = reason;
          e.error = why;
          out.emplace_back(s.on_event, e);
        }
        all &= s.done[k];
      }
      if (all) {
        arrivals_.erase(it->first);
        it = requests_.erase(it);
      } else {
        ++it;
      }
    }
    next_.Clear();
  }
  for (auto& [cb, e] : out)
    if (cb) cb(e);
}

void dp_leader::send_header(int64_t kind, int64_t bytes) {
  tensor head = tensor::from_vector(std::vector<int64_t>{kind, bytes, steps_.load(), 0}, {4});
  comm_->broadcast(head, 0);
  last_header_ = clk::now();
}

void dp_leader::fail_group(const std::exception& e) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (broken_.empty()) broken_ = e.what();
    if (scale_.state == "pending" || scale_.state == "moving") {
      scale_.state = "failed";
      scale_.error = e.what();
    }
  }
  log::error("serving group: an iteration failed: {}", e.what());
  if (comm_) comm_->abort(e.what());  // whoever still waits on this group fails now, not at its timeout
  if (elastic_.control && elastic_.members && elastic_.lost && !elastic_.lost().empty()) {
    // Survivors of a loss may wait for a recovery plan (invariant 8): there will be none.
    const std::vector<int> lost = elastic_.lost();
    for (int m : elastic_.members()) {
      if (m == elastic_.control->rank() || std::find(lost.begin(), lost.end(), m) != lost.end()) continue;
      try {
        elastic_.control->send(tensor::from_vector(std::vector<int64_t>{-1}, {1}), m, tag_recover);
      } catch (const std::exception& x) {
        log::warn("serving group: could not tell pool rank {} that the group broke: {}", m, x.what());
      }
    }
  }
  fail_remote(e.what(), "error");
}

// Samples of `s` (indices, unfinished, on ranks that left) go to ranks the policy picks among the group's
// now. q is the request as sent: it goes again whole when none of its samples has sent anything yet;
// else each sample resumes on its own from the tokens its client has (engine.h invariant 10). Under mu_.
void dp_leader::place(serve::DpRequest q, request_state& s, std::vector<int> samples) {
  const int64_t bs = eng_.options().block_size;
  bool whole = static_cast<int64_t>(samples.size()) == std::max<int64_t>(q.n(), 1) && !s.prompt_logprobs_sent;
  for (int i : samples) whole = whole && s.sent[static_cast<size_t>(i)].empty();
  const auto now = clk::now();
  auto send = [&](serve::DpRequest one) {
    // Its latencies go on from where they were: TTFT from the arrival at rank 0, the next token's gap
    // from the last one its client got (engine.h invariant 10).
    one.set_waited_us(std::chrono::duration_cast<std::chrono::microseconds>(now - s.arrival).count());
    std::vector<int32_t> tokens(one.prompt().begin(), one.prompt().end());
    tokens.insert(tokens.end(), one.resume_tokens().begin(), one.resume_tokens().end());
    for (size_t r = 0; r < loads_.size(); ++r) loads_[r].pending_blocks = pending_blocks_[r];
    const int rank = policy_->pick(tokens, loads_);
    record_dispatch(rank, tokens, blocks_of(static_cast<int64_t>(tokens.size()), bs));
    if (rank != 0) {
      one.set_rank(rank);
      *next_.add_requests() = std::move(one);
      return rank;
    }
    const std::string id = one.id();
    arrivals_.erase(id);
    try {
      engine_request r = request_of(one, grammars_, now);
      r.admitted = true;  // never refused for a full queue (engine.h)
      r.on_event = [this, id](const engine_event& e) { deliver(id, e); };
      eng_.submit(std::move(r));
    } catch (const std::exception& e) {  // this request alone ends (after the lock: deliver takes it)
      log::error("serving group: request {} could not move to rank 0: {}", id, e.what());
      const int64_t n = one.resumed() ? 1 : std::max<int64_t>(one.n(), 1);
      for (int64_t i = 0; i < n; ++i) {
        engine_event ev;
        ev.index = one.resumed() ? one.resume_index() : i;
        ev.finished = true;
        ev.finish_reason = "error";
        ev.error = fmt::format("moving the request off a rank that left failed: {}", e.what());
        failed_moves_.emplace_back(id, ev);
      }
    }
    return 0;
  };
  if (whole) {
    const int rank = send(q);
    for (int i : samples) s.rank[static_cast<size_t>(i)] = rank;
    scale_.moved_samples += static_cast<int64_t>(samples.size());
    return;
  }
  for (int i : samples) {
    const auto k = static_cast<size_t>(i);
    serve::DpRequest one = q;
    one.set_n(1);
    one.set_resumed(true);
    one.set_resume_index(i);
    one.clear_resume_tokens();
    for (int32_t t : s.sent[k]) one.add_resume_tokens(t);
    one.set_resume_cumulative_logprob(s.cumulative[k]);
    if (!s.sent[k].empty())
      one.set_resume_last_token_us(std::chrono::duration_cast<std::chrono::microseconds>(now - s.last_sent[k]).count());
    one.set_resume_prompt_logprobs_sent(s.prompt_logprobs_sent);
    s.rank[k] = send(std::move(one));
    ++scale_.moved_samples;
  }
}

// Under mu_: a rank that went (left or lost) keeps its counters in the group's totals.
void dp_leader::retire_locked(const serve::DpReport& rep) {
  retired_.set_generated_tokens(retired_.generated_tokens() + rep.generated_tokens());
  retired_.set_preemptions(retired_.preemptions() + rep.preemptions());
  retired_.set_prompt_tokens(retired_.prompt_tokens() + rep.prompt_tokens());
  retired_.set_prefix_lookup_tokens(retired_.prefix_lookup_tokens() + rep.prefix_lookup_tokens());
  retired_.set_prefix_hit_tokens(retired_.prefix_hit_tokens() + rep.prefix_hit_tokens());
  for (int i = 0; i < rep.ttft_counts_size(); ++i) {
    if (retired_.ttft_counts_size() <= i) retired_.add_ttft_counts(0);
    retired_.set_ttft_counts(i, retired_.ttft_counts(i) + rep.ttft_counts(i));
  }
  for (int i = 0; i < rep.tpot_counts_size(); ++i) {
    if (retired_.tpot_counts_size() <= i) retired_.add_tpot_counts(0);
    retired_.set_tpot_counts(i, retired_.tpot_counts(i) + rep.tpot_counts(i));
  }
  retired_.set_ttft_sum(retired_.ttft_sum() + rep.ttft_sum());
  retired_.set_tpot_sum(retired_.tpot_sum() + rep.tpot_sum());
}

// Under mu_: rank r's report of an iteration (its events already delivered).
void dp_leader::take_report_locked(int r, serve::DpReport rep) {
  const auto k = static_cast<size_t>(r);
  rep.clear_events();
  loads_[k] = load_of(rep, eng_.options().block_size);
  pending_blocks_[k] -= in_step_blocks_[k];
  in_step_blocks_[k] = 0;
  reports_[k] = std::move(rep);
}

// Under mu_: the per-rank state follows a new layout. Old group rank g is old_to_new[g] in a group of
// `ranks` (-1: it left or was lost); rank 0 stays 0. Queued requests and aborts are renumbered; the
// unfinished samples of ranks that went are placed again (invariant 7), those being aborted end.
void dp_leader::regroup_locked(const std::vector<int>& old_to_new, int ranks,
                               std::vector<std::pair<std::string, engine_event>>& aborted) {
  const auto M = static_cast<size_t>(ranks);
  auto rank_of = [&](int g) { return g >= 0 && g < static_cast<int>(old_to_new.size()) ? old_to_new[size_t(g)] : -1; };
  for (size_t g = 0; g < old_to_new.size() && g < reports_.size(); ++g)
    if (old_to_new[g] < 0) retire_locked(reports_[g]);
  auto remap = [&](auto& v, auto fill) {
    std::remove_reference_t<decltype(v)> out(M, fill);
    for (size_t g = 0; g < old_to_new.size() && g < v.size(); ++g)
      if (old_to_new[g] >= 0) out[static_cast<size_t>(old_to_new[g])] = std::move(v[g]);
    v = std::move(out);
  };
  remap(loads_, dp_rank_load{0, eng_.num_blocks(), 0, 0, 0});
  remap(pending_blocks_, int64_t{0});
  remap(in_step_blocks_, int64_t{0});
  remap(dispatched_, int64_t{0});
  remap(reports_, serve::DpReport());
  for (int g = static_cast<int>(old_to_new.size()) - 1; g >= 1; --g)
    if (old_to_new[static_cast<size_t>(g)] < 0) policy_->remove(g);
  policy_->resize(ranks);
  std::vector<std::string> abort_ids;
  serve::DpStep old;
  old.Swap(&next_);
  for (auto& a : *old.mutable_aborts()) {
    const int n = rank_of(a.rank());
    if (n < 0) {
      abort_ids.push_back(a.id());
      continue;
    }
    a.set_rank(n);
    *next_.add_aborts() = a;
  }
  for (auto& q : *old.mutable_requests()) {
    const int n = rank_of(q.rank());
    if (n < 0) continue;  // its samples are placed again below
    q.set_rank(n);
    *next_.add_requests() = std::move(q);
  }
  for (auto& [id, s] : requests_) {
    std::vector<int> moving;
    for (int64_t i = 0; i < s.n; ++i) {
      const auto k = static_cast<size_t>(i);
      if (s.done[k] || s.rank[k] == 0) continue;
      const int n = rank_of(s.rank[k]);
      if (n >= 0) s.rank[k] = n;
      else moving.push_back(static_cast<int>(i));
    }
    if (moving.empty()) continue;
    if (std::find(abort_ids.begin(), abort_ids.end(), id) != abort_ids.end()) {
      for (int i : moving) {
        engine_event e;
        e.index = i;
        e.finished = true;
        e.finish_reason = "abort";
        aborted.emplace_back(id, e);
      }
      continue;
    }
    place(s.spec, s, moving);  // once for all its samples (queued copies for a rank that went are dropped)
  }
}

// Invariant 7, first boundary: the plan to the group and the joining ranks; the moves start.
void dp_leader::begin_scale(int target) {
  const auto t_start = clk::now();
  const int from = comm_->size();
  TROUPE_CHECK(elastic_.plan != nullptr, errc::internal, "serving group: no dp_elastic::plan to change the size with");
  serve::DpScale plan = elastic_.plan(target);
  {
    std::lock_guard<std::mutex> g(mu_);
    plan.set_epoch(scale_.epoch + 1);
    scale_.last_wait_seconds = std::chrono::duration<double>(t_start - scale_requested_).count();
    scale_.state = "moving";
  }
  plan.set_num_blocks(eng_.num_blocks());
  log::info("serving group: {} from {} to {} ranks (layout {}); the weights move while it serves",
            target > from ? "growing" : "shrinking", from, target, plan.epoch());
  const std::string body = plan.SerializeAsString();
  send_header(kind_prepare, static_cast<int64_t>(body.size()));
  tensor b = bytes_tensor(body);
  comm_->broadcast(b, 0);
  if (target > from && elastic_.announce) elastic_.announce(plan);
  elastic_.prepare(plan);
  plan_ = plan;
}

// Invariant 7, the boundary after rank 0's moves are ready: every rank switches.
void dp_leader::commit_scale() {
  const serve::DpScale plan = plan_;
  const int from = plan.from_ranks(), target = plan.to_ranks();
  const auto t_commit = clk::now();
  if (elastic_.move_error) {  // nothing is switched when rank 0's own moves failed
    const std::string why = elastic_.move_error();
    TROUPE_CHECK(why.empty(), errc::io, "serving group: the change to {} ranks failed: {}", target, why);
  }
  const std::string body = plan.SerializeAsString();
  send_header(kind_commit, static_cast<int64_t>(body.size()));
  tensor b = bytes_tensor(body);
  comm_->broadcast(b, 0);
  runtime::communicator* next = elastic_.commit(plan);
  comm_ = next;  // the old communicator is gone
  TROUPE_CHECK(next != nullptr && next->size() == target && next->rank() == 0, errc::internal,
               "serving group: the change to {} ranks gave rank 0 a communicator of {} ranks", target,
               next ? next->size() : 0);
  std::vector<std::pair<std::string, engine_event>> aborted;
  {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<int> old_to_new(static_cast<size_t>(from));
    for (int k = 0; k < from; ++k) old_to_new[static_cast<size_t>(k)] = k < target ? k : -1;
    regroup_locked(old_to_new, target, aborted);
    scale_.epoch = plan.epoch();
    scale_.ranks = target;  // "done" once the first iteration on the new layout ran (step)
    if (target > from) ++scale_.scale_ups;
    else ++scale_.scale_downs;
    scale_.last_move_seconds = std::chrono::duration<double>(t_commit - scale_requested_).count() -
                               scale_.last_wait_seconds;
    scale_.last_switch_seconds = std::chrono::duration<double>(clk::now() - t_commit).count();
  }
  for (const auto& [id, e] : aborted) deliver(id, e);
  std::vector<std::pair<std::string, engine_event>> failed;
  {
    std::lock_guard<std::mutex> g(mu_);
    failed.swap(failed_moves_);
  }
  for (const auto& [id, e] : failed) deliver(id, e);
}

bool dp_leader::loss_pending() const {
  if (!elastic_.lost || !elastic_.members) return false;
  const std::vector<int> lost = elastic_.lost();
  if (lost.empty()) return false;
  for (int m : elastic_.watched ? elastic_.watched() : elastic_.members())
    if (std::find(lost.begin(), lost.end(), m) != lost.end()) return true;
  return false;
}

bool dp_leader::await_loss() const {
  if (!elastic_.lost || !elastic_.recover) return false;
  const auto until = clk::now() + std::chrono::milliseconds(loss_wait_ms);
  while (!loss_pending()) {
    if (clk::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// Invariant 8: the survivors rebuild the group; what the failed iteration left is put right.
void dp_leader::recover() {
  const auto t0 = clk::now();
  TROUPE_CHECK(elastic_.plan_recovery && elastic_.recover && elastic_.control && elastic_.members, errc::unsupported,
               "serving group: a rank was lost and this group cannot recover (no dp_elastic recovery)");
  std::vector<int> joiners;  // of a change given up (dp_member.h invariant 11): standby again
  {
    std::unique_lock<std::mutex> g(mu_);
    const bool committed = scale_.state == "moving" && scale_.epoch >= plan_.epoch();
    if (committed) {  // switched already: the loss came in its first iteration
      scale_.last_total_seconds = std::chrono::duration<double>(clk::now() - scale_requested_).count();
      scale_.state = "done";
    } else if (scale_.state == "moving") {
      TROUPE_CHECK(elastic_.abandon, errc::unsupported,
                   "serving group: a rank was lost while the weights of the change to {} ranks were moving; this "
                   "group cannot give the change up",
                   scale_.target);
      const std::vector<int> lost = elastic_.lost();
      for (int m : plan_.to_members())
        if (std::find(plan_.from_members().begin(), plan_.from_members().end(), m) == plan_.from_members().end() &&
            std::find(lost.begin(), lost.end(), m) == lost.end())
          joiners.push_back(m);
      std::vector<int> lost_in_change;
      for (int m : lost)
        if (std::find(plan_.to_members().begin(), plan_.to_members().end(), m) != plan_.to_members().end() ||
            std::find(plan_.from_members().begin(), plan_.from_members().end(), m) != plan_.from_members().end())
          lost_in_change.push_back(m);
      scale_.state = "failed";
      scale_.error = fmt::format("abandoned: pool rank(s) {} were lost while the weights moved; the group is as "
                                 "before the change, less what was lost",
                                 fmt::join(lost_in_change, ", "));
      scale_.epoch = plan_.epoch();  // the abandoned layout's number is not used again
      ++scale_.abandoned;
      g.unlock();
      log::warn("serving group: the change to {} ranks (layout {}) is abandoned: pool rank(s) {} were lost while "
                "the weights moved",
                plan_.to_ranks(), plan_.epoch(), fmt::join(lost_in_change, ", "));
      elastic_.abandon();
    }
  }
  const std::vector<int> members = elastic_.members(), lost_all = elastic_.lost();
  std::vector<int> gone;
  for (int m : members)
    if (std::find(lost_all.begin(), lost_all.end(), m) != lost_all.end()) gone.push_back(m);
  serve::DpScale plan = elastic_.plan_recovery(gone);
  {
    std::lock_guard<std::mutex> g(mu_);
    plan.set_epoch(scale_.epoch + 1);
    if (scale_.state == "pending") {
      scale_.state = "failed";
      scale_.error = fmt::format("dropped: pool rank(s) {} were lost before the change began", fmt::join(gone, ", "));
    }
  }
  const int64_t n = steps_.load();
  plan.set_num_blocks(eng_.num_blocks());
  plan.set_step(n);
  const auto& F = plan.from_members();
  const auto& T = plan.to_members();
  log::warn("serving group: pool rank(s) {} lost during iteration {}; the group goes on with {} of its {} ranks "
            "(layout {})",
            fmt::join(gone, ", "), n, T.size(), F.size(), plan.epoch());
  std::vector<int> old_to_new(static_cast<size_t>(F.size()), -1);
  for (int g = 0; g < F.size(); ++g)
    for (int k = 0; k < T.size(); ++k)
      if (T[k] == F[g]) old_to_new[static_cast<size_t>(g)] = k;
  runtime::communicator& ctl = *elastic_.control;
  for (int j : joiners)  // dp_await_abandoned, or follower_recover on a joiner that had switched
    ctl.send(tensor::from_vector(std::vector<int64_t>{-2}, {1}), j, tag_recover);
  const std::string body = plan.SerializeAsString();
  for (int k = 1; k < T.size(); ++k) {
    ctl.send(tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(body.size())}, {1}), T[k], tag_recover);
    ctl.send(bytes_tensor(body), T[k], tag_recover);
  }
  std::vector<serve::DpResync> back(static_cast<size_t>(T.size()));
  for (int k = 1; k < T.size(); ++k) {
    tensor len = tensor::zeros({1}, runtime::dtype::i64);
    ctl.recv(len, T[k], tag_recover);
    const int64_t bytes = len.data<int64_t>()[0];
    TROUPE_CHECK(bytes >= 0 && bytes < (int64_t{1} << 31), errc::internal,
                 "serving group: pool rank {} answered the recovery with {} bytes", T[k], bytes);
    tensor b = tensor::empty({std::max<int64_t>(bytes, 1)}, runtime::dtype::u8);
    if (bytes > 0) ctl.recv(b, T[k], tag_recover);
    TROUPE_CHECK(back[static_cast<size_t>(k)].ParseFromString(tensor_bytes(b, bytes)), errc::internal,
                 "serving group: pool rank {} answered the recovery with something that does not parse", T[k]);
  }
  runtime::communicator* next = elastic_.recover(plan);
  comm_ = next;
  TROUPE_CHECK(next != nullptr && next->size() == T.size() && next->rank() == 0, errc::internal,
               "serving group: the recovery gave rank 0 a communicator of {} ranks, expected {}",
               next ? next->size() : 0, T.size());
  // The failed iteration's reports that never reached rank 0: their events, once.
  std::vector<const serve::DpReport*> last(static_cast<size_t>(T.size()), nullptr);
  for (int k = 1; k < T.size(); ++k) {
    const auto& r = back[static_cast<size_t>(k)];
    for (int i = 0; i < r.reports_size() && i < r.report_steps_size(); ++i) {
      if (r.report_steps(i) != n) continue;
      for (const auto& ev : r.reports(i).events()) deliver(ev.id(), decode_event(ev));
      last[static_cast<size_t>(k)] = &r.reports(i);
    }
  }
  std::vector<std::pair<std::string, engine_event>> aborted;
  {
    std::lock_guard<std::mutex> g(mu_);
    // The failed iteration's requests and aborts go again to the ranks that did not take them in (and
    // to the lost ones, whose samples the regroup places elsewhere), before anything newer.
    std::vector<int64_t> applied(static_cast<size_t>(F.size()), -1);
    applied[0] = n;
    for (int k = 1; k < T.size(); ++k)
      for (int g = 0; g < F.size(); ++g)
        if (F[g] == T[k]) applied[static_cast<size_t>(g)] = back[static_cast<size_t>(k)].applied_step();
    auto again = [&](int g) { return g > 0 && g < F.size() && applied[static_cast<size_t>(g)] < n; };
    serve::DpStep merged;
    for (const auto& q : inflight_.requests())
      if (again(q.rank())) *merged.add_requests() = q;
    for (const auto& a : inflight_.aborts())
      if (again(a.rank())) *merged.add_aborts() = a;
    for (auto& q : *next_.mutable_requests()) *merged.add_requests() = std::move(q);
    for (auto& a : *next_.mutable_aborts()) *merged.add_aborts() = std::move(a);
    next_.Swap(&merged);
    inflight_.Clear();
    regroup_locked(old_to_new, T.size(), aborted);
    for (int k = 1; k < T.size(); ++k)
      if (last[static_cast<size_t>(k)]) take_report_locked(k, *last[static_cast<size_t>(k)]);
    std::fill(in_step_blocks_.begin(), in_step_blocks_.end(), 0);
    scale_.epoch = plan.epoch();
    scale_.ranks = scale_.target = T.size();
    ++scale_.recoveries;
    scale_.lost_ranks += static_cast<int64_t>(gone.size());
    scale_.last_recovery_seconds = std::chrono::duration<double>(clk::now() - t0).count();
    if (elastic_.pool_alive) scale_.pool_ranks = elastic_.pool_alive();
  }
  // The failed iteration's retry is a new iteration: a survivor's "applied" and its reports never
  // confuse the two, should another loss come (invariant 8).
  ++steps_;
  for (const auto& [id, e] : aborted) deliver(id, e);
  std::vector<std::pair<std::string, engine_event>> failed;
  {
    std::lock_guard<std::mutex> g(mu_);
    failed.swap(failed_moves_);
  }
  for (const auto& [id, e] : failed) deliver(id, e);
  log::warn("serving group: recovered in {:.3f} s: {} ranks serve (layout {})",
            std::chrono::duration<double>(clk::now() - t0).count(), T.size(), plan.epoch());
}

bool dp_leader::step() {
  {
    std::lock_guard<std::mutex> g(mu_);
    TROUPE_CHECK(broken_.empty(), errc::aborted, "serving group: broken since an earlier iteration: {}", broken_);
    TROUPE_CHECK(!finished_, errc::invalid_argument, "serving group: an iteration after the group ended");
  }
  if (loss_pending()) {  // noticed between iterations (an idle group): rebuild first
    try {
      recover();
    } catch (const std::exception& e) {
      fail_group(e);
      throw;
    }
    return true;
  }
  int target = 0;
  bool moving = false;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (scale_.state == "pending") target = scale_.target;
    moving = scale_.state == "moving";
  }
  bool committed = false;
  try {
    if (target > 0) begin_scale(target);
    else if (moving && elastic_.ready()) {
      if (elastic_.move_error && !elastic_.move_error().empty() && await_loss()) {
        recover();  // the moves failed because a rank of the change was lost: it is given up
        return true;
      }
      commit_scale();
      committed = true;
    }
  } catch (const std::exception& e) {
    fail_group(e);
    throw;
  }
  serve::DpStep step;
  bool remote_work = false;
  {
    std::lock_guard<std::mutex> g(mu_);
    step.Swap(&next_);
    for (const auto& [id, s] : requests_) remote_work |= s.remote_unfinished();
    in_step_blocks_ = pending_blocks_;
    in_step_blocks_[0] = 0;
    const auto now = clk::now();
    for (auto& q : *step.mutable_requests()) {  // how long it has waited: its rank's TTFT starts at rank 0
      auto it = arrivals_.find(q.id());
      if (it == arrivals_.end()) continue;
      q.set_waited_us(std::chrono::duration_cast<std::chrono::microseconds>(now - it->second).count());
      arrivals_.erase(it);
    }
  }
  inflight_ = step;  // a recovery sends it again to whoever did not take it in (invariant 8)
  if (!remote_work && step.requests_size() == 0 && step.aborts_size() == 0 && !eng_.has_work()) {
    if (committed) {
      std::lock_guard<std::mutex> g(mu_);
      scale_.last_total_seconds = std::chrono::duration<double>(clk::now() - scale_requested_).count();
      scale_.state = "done";
    }
    // Idle while the weights move: look again in a moment (the scheduler steps while a change is on);
    // the group hears from rank 0 as often as when idle (invariant 2).
    if (moving && !committed) {
      if (clk::now() - last_header_ > std::chrono::milliseconds(eng_.keepalive_ms())) {
        try {
          send_header(kind_idle, 0);
        } catch (const std::exception& e) {
          fail_group(e);
          throw;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return committed || target > 0;
  }
  try {
    const int P = comm_->size();
    const std::string body = step.SerializeAsString();
    send_header(kind_step, static_cast<int64_t>(body.size()));
    if (!body.empty()) {
      tensor b = bytes_tensor(body);
      comm_->broadcast(b, 0);
    }
    eng_.step_or_idle();
    if (hooks_.after_step) hooks_.after_step(steps_);
    std::vector<serve::DpReport> reports(static_cast<size_t>(P));
    for (int r = 1; r < P; ++r) {
      tensor len = tensor::zeros({1}, runtime::dtype::i64);
      comm_->recv(len, r, tag_report);
      const int64_t n = len.data<int64_t>()[0];
      TROUPE_CHECK(n >= 0 && n < (int64_t{1} << 31), errc::internal, "serving group: rank {} reported {} bytes", r, n);
      tensor b = tensor::empty({std::max<int64_t>(n, 1)}, runtime::dtype::u8);
      if (n > 0) comm_->recv(b, r, tag_report);
      TROUPE_CHECK(reports[static_cast<size_t>(r)].ParseFromString(tensor_bytes(b, n)), errc::internal,
                   "serving group: rank {} sent a report that does not parse", r);
    }
    inflight_.Clear();  // every rank has it: what follows cannot be undone
    for (int r = 1; r < P; ++r)
      for (const auto& ev : reports[static_cast<size_t>(r)].events()) deliver(ev.id(), decode_event(ev));
    {
      std::lock_guard<std::mutex> g(mu_);
      for (int r = 1; r < P; ++r) take_report_locked(r, std::move(reports[static_cast<size_t>(r)]));
      pending_blocks_[0] = 0;
      if (committed) {
        scale_.last_total_seconds = std::chrono::duration<double>(clk::now() - scale_requested_).count();
        scale_.state = "done";
      }
    }
    ++steps_;
    if (hooks_.want_sync && hooks_.want_sync()) {
      send_header(kind_sync, 0);
      if (hooks_.sync) hooks_.sync();
    }
  } catch (const std::exception& e) {  // the group is out of step: nothing more can pair
    if (await_loss()) {  // invariant 8
      log::warn("serving group: iteration {} failed: {}", steps_.load(), e.what());
      try {
        recover();
      } catch (const std::exception& e2) {
        fail_group(e2);
        throw;
      }
      return true;
    }
    fail_group(e);
    throw;
  }
  return true;
}

void dp_leader::keepalive() {
  if (finished_ || broken() || loss_pending()) return;  // a loss: the next step rebuilds the group
  try {
    send_header(kind_idle, 0);
  } catch (const std::exception& e) {
    if (await_loss()) return;  // invariant 8: the next step rebuilds the group
    {
      std::lock_guard<std::mutex> g(mu_);
      if (broken_.empty()) broken_ = e.what();
    }
    fail_remote(e.what(), "error");
    throw;
  }
}

void dp_leader::finish() {
  if (finished_) return;
  finished_ = true;
  bool moving = false;
  {
    std::lock_guard<std::mutex> g(mu_);
    moving = scale_.state == "moving" && broken_.empty();
  }
  if (moving) {  // a change under way completes first, so that every rank hears the end where it waits
    for (int i = 0; i < 60000 && !elastic_.ready(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    try {
      commit_scale();
      std::lock_guard<std::mutex> g(mu_);
      scale_.state = "done";
    } catch (const std::exception& e) {
      log::warn("serving group: the change under way at the end failed: {}", e.what());
      std::lock_guard<std::mutex> g(mu_);
      if (broken_.empty()) broken_ = e.what();
    }
  }
  if (elastic_.end) {
    try {
      elastic_.end();
    } catch (const std::exception& e) {
      log::warn("serving group: could not tell the standby ranks to stop: {}", e.what());
    }
  }
  if (broken()) return;  // the others leave on their communicator's error
  send_header(kind_end, 0);
}

void dp_leader::shutdown() {
  {
    std::lock_guard<std::mutex> g(mu_);
    shut_ = true;  // submits from now on are refused
  }
  eng_.shutdown();  // rank 0's requests end with "abort"
  fail_remote("", "abort");
  finish();
}

std::vector<dp_rank_load> dp_leader::loads() const {
  std::lock_guard<std::mutex> g(mu_);
  auto out = loads_;
  const engine_stats st = eng_.stats();
  out[0].blocks_used = st.kv.blocks_used;
  out[0].running = st.running;
  out[0].waiting = st.waiting;
  for (size_t k = 0; k < out.size(); ++k) out[k].pending_blocks = pending_blocks_[k];
  return out;
}

std::vector<int64_t> dp_leader::dispatched() const {
  std::lock_guard<std::mutex> g(mu_);
  return dispatched_;
}

dp_leader::summary_t dp_leader::summary() const {
  const engine_stats st = eng_.stats();
  std::lock_guard<std::mutex> g(mu_);
  const int P = scale_.ranks;
  summary_t out;
  serving_gauges& sg = out.gauges;
  sg.waiting = st.waiting;
  sg.running = st.running;
  sg.generated_tokens = st.generated_tokens;
  sg.preemptions = st.preemptions;
  sg.prompt_tokens = st.prompt_tokens;
  int64_t used = st.kv.blocks_used, blocks = st.kv.num_blocks;
  int64_t lookup = st.kv.prefix_lookup_tokens, hit = st.kv.prefix_hit_tokens;
  for (int r = 1; r < P; ++r) {
    const auto& rep = reports_[static_cast<size_t>(r)];
    sg.waiting += rep.waiting();
    sg.running += rep.running();
    sg.generated_tokens += rep.generated_tokens();
    sg.preemptions += rep.preemptions();
    sg.prompt_tokens += rep.prompt_tokens();
    used += rep.blocks_used();
    blocks += rep.num_blocks();
    lookup += rep.prefix_lookup_tokens();
    hit += rep.prefix_hit_tokens();
  }
  sg.generated_tokens += retired_.generated_tokens();
  sg.preemptions += retired_.preemptions();
  sg.prompt_tokens += retired_.prompt_tokens();
  lookup += retired_.prefix_lookup_tokens();
  hit += retired_.prefix_hit_tokens();
  sg.kv_usage = blocks ? double(used) / double(blocks) : 0.0;
  sg.prefix_hit_rate = lookup ? double(hit) / double(lookup) : 0.0;
  out.ttft = eng_.ttft_histogram();
  out.tpot = eng_.tpot_histogram();
  merge(out.ttft, retired_.ttft_counts(), retired_.ttft_sum());
  merge(out.tpot, retired_.tpot_counts(), retired_.tpot_sum());
  for (int r = 1; r < P; ++r) {
    const auto& rep = reports_[static_cast<size_t>(r)];
    merge(out.ttft, rep.ttft_counts(), rep.ttft_sum());
    merge(out.tpot, rep.tpot_counts(), rep.tpot_sum());
  }
  return out;
}

std::string dp_leader::metrics_text() const {
  const summary_t sum = summary();
  const engine_stats st = eng_.stats();
  std::lock_guard<std::mutex> g(mu_);
  const int P = scale_.ranks;
  const serving_gauges& sg = sum.gauges;
  const latency_histogram &ttft = sum.ttft, &tpot = sum.tpot;
  std::string out;
  out += ttft.prometheus("troupe_time_to_first_token_seconds",
                         "Time from arrival at rank 0 to the first token (every rank's requests).");
  out += tpot.prometheus("troupe_time_per_output_token_seconds", "Time between consecutive output tokens.");
  out += serving_gauges_text(sg);
  out += fmt::format(
      "# HELP troupe_engine_ranks Worker ranks of the serving group.\n# TYPE troupe_engine_ranks gauge\n"
      "troupe_engine_ranks {}\n"
      "# HELP troupe_dp_iterations_total Lockstep iterations of the data-parallel group.\n"
      "# TYPE troupe_dp_iterations_total counter\ntroupe_dp_iterations_total {}\n",
      P, steps_.load());
  out += fmt::format("# HELP troupe_dp_dispatched_total Requests the dispatcher ({}) sent to each rank.\n"
                     "# TYPE troupe_dp_dispatched_total counter\n",
                     policy_->name());
  for (int r = 0; r < P; ++r) out += fmt::format("troupe_dp_dispatched_total{{rank=\"{}\"}} {}\n", r, dispatched_[size_t(r)]);
  out += "# HELP troupe_dp_rank_kv_blocks_used KV blocks in use on each rank.\n"
         "# TYPE troupe_dp_rank_kv_blocks_used gauge\n";
  for (int r = 0; r < P; ++r)
    out += fmt::format("troupe_dp_rank_kv_blocks_used{{rank=\"{}\"}} {}\n", r,
                       r == 0 ? st.kv.blocks_used : reports_[size_t(r)].blocks_used());
  out += "# HELP troupe_dp_rank_running Requests in each rank's batch.\n# TYPE troupe_dp_rank_running gauge\n";
  for (int r = 0; r < P; ++r)
    out += fmt::format("troupe_dp_rank_running{{rank=\"{}\"}} {}\n", r, r == 0 ? st.running : reports_[size_t(r)].running());
  if (elastic_.pool_ranks > 0) {
    dp_scale_status s = scale_;
    if (elastic_.pool_alive) s.pool_ranks = elastic_.pool_alive();
    out += fmt::format(
        "# HELP troupe_scale_pool_ranks Processes able to serve (the group and its standby ranks).\n"
        "# TYPE troupe_scale_pool_ranks gauge\ntroupe_scale_pool_ranks {}\n"
        "# HELP troupe_scale_layout The group's layout count (1 at the start, + 1 per change of size).\n"
        "# TYPE troupe_scale_layout gauge\ntroupe_scale_layout {}\n"
        "# HELP troupe_scale_events_total Changes of the group's size.\n# TYPE troupe_scale_events_total counter\n"
        "troupe_scale_events_total{{direction=\"up\"}} {}\ntroupe_scale_events_total{{direction=\"down\"}} {}\n"
        "# HELP troupe_scale_moved_samples_total Samples resumed on another rank when theirs left.\n"
        "# TYPE troupe_scale_moved_samples_total counter\ntroupe_scale_moved_samples_total {}\n"
        "# HELP troupe_scale_last_seconds The last change's phases: wait (request to the iteration boundary), "
        "move (weights and communicators, beside serving), switch (the commit, iterations paused), total (request "
        "to the first iteration on the new layout).\n# TYPE troupe_scale_last_seconds gauge\n"
        "troupe_scale_last_seconds{{phase=\"wait\"}} {:.6f}\ntroupe_scale_last_seconds{{phase=\"move\"}} {:.6f}\n"
        "troupe_scale_last_seconds{{phase=\"switch\"}} {:.6f}\ntroupe_scale_last_seconds{{phase=\"total\"}} {:.6f}\n"
        "# HELP troupe_scale_recoveries_total Losses of a serving rank the group survived.\n"
        "# TYPE troupe_scale_recoveries_total counter\ntroupe_scale_recoveries_total {}\n"
        "# HELP troupe_scale_lost_ranks_total Serving ranks lost.\n# TYPE troupe_scale_lost_ranks_total counter\n"
        "troupe_scale_lost_ranks_total {}\n"
        "# HELP troupe_scale_last_recovery_seconds The last recovery: rank 0 starting it to the group rebuilt.\n"
        "# TYPE troupe_scale_last_recovery_seconds gauge\ntroupe_scale_last_recovery_seconds {:.6f}\n"
        "# HELP troupe_scale_abandoned_total Changes given up because a rank of theirs was lost.\n"
        "# TYPE troupe_scale_abandoned_total counter\ntroupe_scale_abandoned_total {}\n",
        s.pool_ranks, s.epoch, s.scale_ups, s.scale_downs, s.moved_samples, s.last_wait_seconds,
        s.last_move_seconds, s.last_switch_seconds, s.last_total_seconds, s.recoveries, s.lost_ranks,
        s.last_recovery_seconds, s.abandoned);
  }
  return out + eng_.expert_metrics_text();
}

// ---- ranks 1..P-1 ----------------------------------------------------------------------------------

namespace {
dp_follow_result follow(engine& eng, runtime::communicator*& comm, const group_hooks& hooks, const dp_elastic& el);
}  // namespace

dp_follow_result dp_follow(engine& eng, runtime::communicator& comm, const group_hooks& hooks, const dp_elastic& el) {
  TROUPE_CHECK(comm.rank() != 0, errc::invalid_argument, "data-parallel serving group: rank 0 leads; it does not follow");
  TROUPE_CHECK(eng.options().group_member, errc::invalid_argument,
               "data-parallel serving group: rank {}'s engine must be made with engine_options::group_member",
               comm.rank());
  runtime::communicator* cur = &comm;
  try {
    return follow(eng, cur, hooks, el);
  } catch (const std::exception& e) {  // out of step: the others fail now, not at their timeout
    if (cur) cur->abort(fmt::format("rank {} left the serving group: {}", cur->rank(), e.what()));
    throw;
  }
}

namespace {

bool loss_in_group(const dp_elastic& el) {
  const std::vector<int> lost = el.lost();
  if (lost.empty()) return false;
  for (int m : el.watched ? el.watched() : el.members())
    if (std::find(lost.begin(), lost.end(), m) != lost.end()) return true;
  return false;
}

// Invariant 8 on a survivor: whether a member of its group was lost (waiting a while for the notice).
bool follower_saw_loss(const dp_elastic& el) {
  if (!el.lost || !el.members || !el.recover || !el.control) return false;
  const auto until = clk::now() + std::chrono::milliseconds(loss_wait_ms);
  while (!loss_in_group(el)) {
    if (clk::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// Invariant 8 on a survivor: rank 0's recovery plan, this rank's DpResync back, the group rebuilt.
runtime::communicator* follower_recover(const dp_elastic& el, int64_t applied,
                                        const std::vector<std::pair<int64_t, serve::DpReport>>& unacked) {
  runtime::communicator& ctl = *el.control;
  const int me = ctl.rank();
  tensor len = tensor::zeros({1}, runtime::dtype::i64);
  ctl.recv(len, 0, tag_recover);
  const int64_t n = len.data<int64_t>()[0];
  TROUPE_CHECK(n != -1, errc::aborted, "serving group: pool rank {}: rank 0 could not recover the group", me);
  if (n == -2) return nullptr;  // this rank joined in a change rank 0 gave up: standby again
  TROUPE_CHECK(n > 0 && n < (int64_t{1} << 30), errc::internal,
               "serving group: pool rank {}: a recovery plan of {} bytes from rank 0", me, n);
  tensor b = tensor::empty({n}, runtime::dtype::u8);
  ctl.recv(b, 0, tag_recover);
  serve::DpScale plan;
  TROUPE_CHECK(plan.ParseFromString(tensor_bytes(b, n)), errc::internal,
               "serving group: pool rank {}: a recovery plan from rank 0 that does not parse", me);
  serve::DpResync r;
  r.set_applied_step(applied);
  for (const auto& [step, rep] : unacked) {
    r.add_report_steps(step);
    *r.add_reports() = rep;
  }
  const std::string body = r.SerializeAsString();
  ctl.send(tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(body.size())}, {1}), 0, tag_recover);
  if (!body.empty()) ctl.send(bytes_tensor(body), 0, tag_recover);
  runtime::communicator* next = el.recover(plan);
  int want = -1;
  for (int k = 0; k < plan.to_members_size(); ++k)
    if (plan.to_members(k) == me) want = k;
  TROUPE_CHECK(next != nullptr && next->size() == plan.to_ranks() && next->rank() == want, errc::internal,
               "serving group: pool rank {}: the recovery gave a communicator of {} ranks, expected rank {} of {}",
               me, next ? next->size() : 0, want, plan.to_ranks());
  return next;
}

enum class follow_next { go_on, ended, left };

dp_follow_result follow(engine& eng, runtime::communicator*& comm, const group_hooks& hooks, const dp_elastic& el) {
  std::map<std::string, std::shared_ptr<const json_grammar>> grammars;
  serve::DpReport report;  // this iteration's events (the engine's callbacks run on this thread)
  dp_follow_result res;
  int64_t applied = -1, current = -1;  // the last iteration whose requests this rank took in; the one it runs
  std::vector<std::pair<int64_t, serve::DpReport>> unacked;  // reports rank 0 may not have delivered yet
  auto iterate = [&]() -> follow_next {
    tensor head = tensor::zeros({4}, runtime::dtype::i64);
    comm->broadcast(head, 0);
    const int64_t* h = head.data<int64_t>();
    // Rank 0 delivers an iteration's reports before its count moves on.
    std::erase_if(unacked, [&](const auto& u) { return u.first < h[2]; });
    if (h[0] == kind_end) {
      eng.shutdown();
      return follow_next::ended;
    }
    if (el.move_error) {  // this rank's moves failed: it leaves now (the group breaks), not at the commit
      const std::string why = el.move_error();
      TROUPE_CHECK(why.empty(), errc::io, "serving group: rank {}: moving weights for a change failed: {}",
                   comm->rank(), why);
    }
    if (h[0] == kind_idle) return follow_next::go_on;
    if (h[0] == kind_sync) {
      if (hooks.sync) hooks.sync();
      return follow_next::go_on;
    }
    TROUPE_CHECK((h[0] == kind_step || h[0] == kind_prepare || h[0] == kind_commit) && h[1] >= 0 &&
                     h[1] < (int64_t{1} << 31),
                 errc::internal,
                 "serving group: rank {}: a malformed iteration header from rank 0 ({}, {})", comm->rank(), h[0], h[1]);
    tensor b = tensor::empty({std::max<int64_t>(h[1], 1)}, runtime::dtype::u8);
    if (h[1] > 0) comm->broadcast(b, 0);
    if (h[0] == kind_prepare || h[0] == kind_commit) {  // invariant 7
      serve::DpScale plan;
      TROUPE_CHECK(plan.ParseFromString(tensor_bytes(b, h[1])) && plan.to_ranks() >= 1 &&
                       plan.from_members_size() == comm->size(),
                   errc::internal, "serving group: rank {}: a change of size from rank 0 that does not parse",
                   comm->rank());
      TROUPE_CHECK(el.prepare && el.commit, errc::internal,
                   "serving group: rank {}: rank 0 changes the group's size, but this rank cannot (no dp_elastic)",
                   comm->rank());
      if (h[0] == kind_prepare) {  // the weights move while this rank goes on serving
        el.prepare(plan);
        return follow_next::go_on;
      }
      const int pool_rank = plan.from_members(comm->rank());
      int me = -1;  // the new group rank
      for (int k = 0; k < plan.to_members_size(); ++k)
        if (plan.to_members(k) == pool_rank) me = k;
      const bool stays = me >= 0;
      if (!stays) {  // rank 0 moves this rank's samples: nothing more is reported
        eng.shutdown();
        report.Clear();
        unacked.clear();
      }
      runtime::communicator* next = el.commit(plan);
      comm = next;  // the old communicator is gone
      if (!stays) return follow_next::left;
      TROUPE_CHECK(next != nullptr && next->size() == plan.to_ranks() && next->rank() == me, errc::internal,
                   "serving group: rank {}: the change to {} ranks gave a communicator of {} ranks", me,
                   plan.to_ranks(), next ? next->size() : 0);
      return follow_next::go_on;
    }
    serve::DpStep step;
    TROUPE_CHECK(step.ParseFromString(tensor_bytes(b, h[1])), errc::internal,
                 "serving group: rank {}: an iteration from rank 0 that does not parse", comm->rank());
    current = h[2];
    const auto now = clk::now();
    for (const auto& q : step.requests()) {
      if (q.rank() != comm->rank()) continue;
      const std::string id = q.id();
      try {
        engine_request r = request_of(q, grammars, now);
        r.on_event = [&report, id](const engine_event& e) { encode_event(id, e, report.add_events()); };
        eng.submit(std::move(r));
      } catch (const std::exception& e) {  // rank 0 checked it; this rank refuses it anyway: it ends here
        log::error("serving group: rank {}: request {} refused: {}", comm->rank(), id, e.what());
        const int64_t n = std::max<int64_t>(q.n(), 1);
        for (int64_t i = 0; i < n; ++i) {
          engine_event ev;
          ev.index = q.resumed() ? q.resume_index() : i;
          ev.finished = true;
          ev.finish_reason = "error";
          ev.error = fmt::format("rank {} refused the request: {}", comm->rank(), e.what());
          ev.prompt_tokens = q.prompt_size();
          encode_event(id, ev, report.add_events());
        }
      }
    }
    for (const auto& a : step.aborts())
      if (a.rank() == comm->rank()) eng.abort(a.id());
    applied = current;
    eng.step_or_idle();
    if (hooks.after_step) hooks.after_step(res.steps);
    fill_load(eng, report);
    unacked.emplace_back(current, std::move(report));
    report.Clear();
    const std::string body = unacked.back().second.SerializeAsString();
    tensor len = tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(body.size())}, {1});
    comm->send(len, 0, tag_report);
    if (!body.empty()) comm->send(bytes_tensor(body), 0, tag_report);
    ++res.steps;
    return follow_next::go_on;
  };
  for (;;) {
    follow_next next = follow_next::go_on;
    try {
      next = iterate();
    } catch (const std::exception& e) {
      if (el.lost && el.control) {  // this rank was declared lost (e.g. frozen, then woken): it is out
        const auto lost = el.lost();
        if (std::find(lost.begin(), lost.end(), el.control->rank()) != lost.end()) throw;
      }
      if (!follower_saw_loss(el)) throw;
      if (el.abandon) el.abandon();  // a change prepared here and not committed is given up
      log::warn("serving group: pool rank {}: a group operation failed after iteration {} ({}); a member was lost, "
                "waiting for rank 0's recovery plan",
                el.control->rank(), current, e.what());
      if (report.events_size() > 0) {  // the failed iteration's events so far (its model pass was undone)
        unacked.emplace_back(current, std::move(report));
        report.Clear();
      }
      comm = follower_recover(el, applied, unacked);
      unacked.clear();
      if (comm == nullptr) {  // rank 0 gave up the change that took this rank in
        eng.shutdown();
        if (el.to_standby) el.to_standby();
        res.left = true;
        return res;
      }
      continue;
    }
    if (next == follow_next::ended) return res;
    if (next == follow_next::left) {
      res.left = true;
      return res;
    }
  }
}

}  // namespace

bool dp_saw_loss(const dp_elastic& el) { return follower_saw_loss(el); }

void dp_await_abandoned(const dp_elastic& el) {
  TROUPE_CHECK(el.control != nullptr, errc::internal, "serving group: no control communicator");
  tensor len = tensor::zeros({1}, runtime::dtype::i64);
  el.control->recv(len, 0, tag_recover);
  TROUPE_CHECK(len.data<int64_t>()[0] == -2, errc::aborted,
               "serving group: pool rank {}: rank 0 did not give up the change whose moves failed ({})",
               el.control->rank(), len.data<int64_t>()[0]);
}

}  // namespace troupe::elastic
