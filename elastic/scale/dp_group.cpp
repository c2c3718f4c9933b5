// elastic/scale/dp_group.cpp — see dp_group.h.
#include "elastic/scale/dp_group.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
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

constexpr int64_t kind_end = 0, kind_step = 1, kind_idle = 2, kind_sync = 3;
constexpr int tag_report = 20101;  // rank r -> 0: its DpReport of an iteration

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

dp_leader::dp_leader(engine& local, runtime::communicator& comm, std::unique_ptr<dp_dispatch_policy> policy,
                     group_hooks hooks)
    : eng_(local), comm_(comm), policy_(std::move(policy)), hooks_(std::move(hooks)),
      loads_(static_cast<size_t>(comm.size())), pending_blocks_(static_cast<size_t>(comm.size()), 0),
      in_step_blocks_(static_cast<size_t>(comm.size()), 0), dispatched_(static_cast<size_t>(comm.size()), 0),
      reports_(static_cast<size_t>(comm.size())) {
  TROUPE_CHECK(comm.rank() == 0, errc::invalid_argument,
               "data-parallel serving group: rank 0 leads, not rank {} (the others run dp_follow)", comm.rank());
  TROUPE_CHECK(policy_ != nullptr, errc::invalid_argument, "data-parallel serving group: no dispatch policy");
  TROUPE_CHECK(local.options().group_member, errc::invalid_argument,
               "data-parallel serving group: rank 0's engine must be made with engine_options::group_member");
  for (auto& l : loads_) l.num_blocks = local.num_blocks();
}

dp_leader::~dp_leader() {
  try {
    finish();
  } catch (const std::exception& e) {
    log::warn("serving group: could not tell the other ranks to stop: {}", e.what());
  }
}

bool dp_leader::broken() const {
  std::lock_guard<std::mutex> g(mu_);
  return !broken_.empty();
}

std::string dp_leader::broken_reason() const {
  std::lock_guard<std::mutex> g(mu_);
  return broken_;
}

void dp_leader::submit(engine_request r) {
  eng_.check_request(r);  // every rank serves the same model with the same blocks (invariant 3)
  if (r.arrival == clk::time_point{}) r.arrival = clk::now();
  const int64_t bs = eng_.options().block_size;
  const int P = comm_.size();
  const int64_t prompt_blocks = blocks_of(static_cast<int64_t>(r.prompt.size()), bs);
  int rank = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    TROUPE_CHECK(broken_.empty(), errc::aborted, "serving group: broken: {}", broken_);
    TROUPE_CHECK(!shut_, errc::aborted, "serving group: request {} after the group stopped", r.id);
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
    rank = policy_->pick(r.prompt, loads_);
    if (rank == 0 && P > 1 && st.waiting + r.n > eng_.options().max_waiting) {
      // rank 0's own queue is full: the least loaded of the others instead
      rank = 1;
      for (int k = 2; k < P; ++k)
        if (loads_[static_cast<size_t>(k)].load() < loads_[static_cast<size_t>(rank)].load()) rank = k;
    }
    request_state s;
    s.rank = rank;
    s.n = r.n;
    s.done.assign(static_cast<size_t>(r.n), false);
    s.on_event = std::move(r.on_event);
    requests_.emplace(r.id, std::move(s));
    samples_ += r.n;
    if (rank != 0) {
      record_dispatch(rank, r.prompt, prompt_blocks);
      serve::DpRequest* q = next_.add_requests();
      q->set_rank(rank);
      q->set_id(r.id);
      for (int32_t t : r.prompt) q->add_prompt(t);
      encode_params(r.params, q->mutable_params());
      q->set_n(r.n);
      q->set_cumulative_logprob(r.cumulative_logprob);
      arrivals_[r.id] = r.arrival;
      return;
    }
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
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = requests_.find(id);
    if (it != requests_.end() && it->second.rank != 0) {
      serve::DpAbort* a = next_.add_aborts();
      a->set_rank(it->second.rank);
      a->set_id(id);
      return;
    }
  }
  eng_.abort(id);
}

bool dp_leader::inbox_pending() const {
  std::lock_guard<std::mutex> g(mu_);
  if (!broken_.empty()) return false;  // nothing will be taken: no busy loop of failing steps
  return eng_.inbox_pending() || next_.requests_size() > 0 || next_.aborts_size() > 0;
}

// A sample's event to its request's callback (outside the lock); the request is forgotten once every
// sample finished.
void dp_leader::deliver(const std::string& id, const engine_event& e) {
  std::function<void(const engine_event&)> cb;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return;
    request_state& s = it->second;
    if (e.index < 0 || e.index >= s.n || s.done[static_cast<size_t>(e.index)]) return;
    cb = s.on_event;
    if (e.finished) {
      s.done[static_cast<size_t>(e.index)] = true;
      --samples_;
      bool all = true;
      for (bool d : s.done) all &= d;
      if (all) requests_.erase(it);
    }
  }
  if (cb) cb(e);
}

// Every remote request's unfinished samples end with `reason` (rank 0's own end through its engine).
void dp_leader::fail_remote(const std::string& why, const std::string& reason) {
  std::vector<std::pair<std::function<void(const engine_event&)>, engine_event>> out;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = requests_.begin(); it != requests_.end();) {
      if (it->second.rank == 0) {
        ++it;
        continue;
      }
      for (int64_t i = 0; i < it->second.n; ++i) {
        if (it->second.done[static_cast<size_t>(i)]) continue;
        --samples_;
        engine_event e;
        e.index = i;
        e.finished = true;
        e.finish_reason = reason;
        e.error = why;
        out.emplace_back(it->second.on_event, e);
      }
      arrivals_.erase(it->first);
      it = requests_.erase(it);
    }
    next_.Clear();
  }
  for (auto& [cb, e] : out)
    if (cb) cb(e);
}

void dp_leader::send_header(int64_t kind, int64_t bytes) {
  tensor head = tensor::from_vector(std::vector<int64_t>{kind, bytes, steps_.load(), 0}, {4});
  comm_.broadcast(head, 0);
}

bool dp_leader::step() {
  {
    std::lock_guard<std::mutex> g(mu_);
    TROUPE_CHECK(broken_.empty(), errc::aborted, "serving group: broken since an earlier iteration: {}", broken_);
    TROUPE_CHECK(!finished_, errc::invalid_argument, "serving group: an iteration after the group ended");
  }
  serve::DpStep step;
  bool remote_work = false;
  {
    std::lock_guard<std::mutex> g(mu_);
    step.Swap(&next_);
    for (const auto& [id, s] : requests_) remote_work |= s.rank != 0;
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
  if (!remote_work && step.requests_size() == 0 && step.aborts_size() == 0 && !eng_.has_work()) return false;
  try {
    const std::string body = step.SerializeAsString();
    send_header(kind_step, static_cast<int64_t>(body.size()));
    if (!body.empty()) {
      tensor b = bytes_tensor(body);
      comm_.broadcast(b, 0);
    }
    eng_.step_or_idle();
    if (hooks_.after_step) hooks_.after_step(steps_);
    std::vector<serve::DpReport> reports(static_cast<size_t>(comm_.size()));
    for (int r = 1; r < comm_.size(); ++r) {
      tensor len = tensor::zeros({1}, runtime::dtype::i64);
      comm_.recv(len, r, tag_report);
      const int64_t n = len.data<int64_t>()[0];
      TROUPE_CHECK(n >= 0 && n < (int64_t{1} << 31), errc::internal, "serving group: rank {} reported {} bytes", r, n);
      tensor b = tensor::empty({std::max<int64_t>(n, 1)}, runtime::dtype::u8);
      if (n > 0) comm_.recv(b, r, tag_report);
      TROUPE_CHECK(reports[static_cast<size_t>(r)].ParseFromString(tensor_bytes(b, n)), errc::internal,
                   "serving group: rank {} sent a report that does not parse", r);
    }
    for (int r = 1; r < comm_.size(); ++r)
      for (const auto& ev : reports[static_cast<size_t>(r)].events()) deliver(ev.id(), decode_event(ev));
    {
      std::lock_guard<std::mutex> g(mu_);
      const int64_t bs = eng_.options().block_size;
      for (int r = 1; r < comm_.size(); ++r) {
        auto& rep = reports[static_cast<size_t>(r)];
        rep.clear_events();
        loads_[static_cast<size_t>(r)] = load_of(rep, bs);
        pending_blocks_[static_cast<size_t>(r)] -= in_step_blocks_[static_cast<size_t>(r)];
        reports_[static_cast<size_t>(r)] = std::move(rep);
      }
      pending_blocks_[0] = 0;
    }
    ++steps_;
    if (hooks_.want_sync && hooks_.want_sync()) {
      send_header(kind_sync, 0);
      if (hooks_.sync) hooks_.sync();
    }
  } catch (const std::exception& e) {  // the group is out of step: nothing more can pair
    {
      std::lock_guard<std::mutex> g(mu_);
      if (broken_.empty()) broken_ = e.what();
    }
    log::error("serving group: an iteration failed: {}", e.what());
    comm_.abort(e.what());  // whoever still waits on this group fails now, not at its timeout
    fail_remote(e.what(), "error");
    throw;
  }
  return true;
}

void dp_leader::keepalive() {
  if (finished_ || broken()) return;
  try {
    send_header(kind_idle, 0);
  } catch (const std::exception& e) {
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

std::string dp_leader::metrics_text() const {
  const engine_stats st = eng_.stats();
  std::lock_guard<std::mutex> g(mu_);
  const int P = comm_.size();
  serving_gauges sg;
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
  sg.kv_usage = blocks ? double(used) / double(blocks) : 0.0;
  sg.prefix_hit_rate = lookup ? double(hit) / double(lookup) : 0.0;
  latency_histogram ttft = eng_.ttft_histogram(), tpot = eng_.tpot_histogram();
  for (int r = 1; r < P; ++r) {
    const auto& rep = reports_[static_cast<size_t>(r)];
    merge(ttft, rep.ttft_counts(), rep.ttft_sum());
    merge(tpot, rep.tpot_counts(), rep.tpot_sum());
  }
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
  return out + eng_.expert_metrics_text();
}

// ---- ranks 1..P-1 ----------------------------------------------------------------------------------

namespace {
int64_t follow(engine& eng, runtime::communicator& comm, const group_hooks& hooks);
}  // namespace

int64_t dp_follow(engine& eng, runtime::communicator& comm, const group_hooks& hooks) {
  TROUPE_CHECK(comm.rank() != 0, errc::invalid_argument, "data-parallel serving group: rank 0 leads; it does not follow");
  TROUPE_CHECK(eng.options().group_member, errc::invalid_argument,
               "data-parallel serving group: rank {}'s engine must be made with engine_options::group_member",
               comm.rank());
  try {
    return follow(eng, comm, hooks);
  } catch (const std::exception& e) {  // out of step: the others fail now, not at their timeout
    comm.abort(fmt::format("rank {} left the serving group: {}", comm.rank(), e.what()));
    throw;
  }
}

namespace {

int64_t follow(engine& eng, runtime::communicator& comm, const group_hooks& hooks) {
  std::map<std::string, std::shared_ptr<const json_grammar>> grammars;
  serve::DpReport report;  // this iteration's events (the engine's callbacks run on this thread)
  int64_t steps = 0;
  for (;;) {
    tensor head = tensor::zeros({4}, runtime::dtype::i64);
    comm.broadcast(head, 0);
    const int64_t* h = head.data<int64_t>();
    if (h[0] == kind_end) {
      eng.shutdown();
      return steps;
    }
    if (h[0] == kind_idle) continue;
    if (h[0] == kind_sync) {
      if (hooks.sync) hooks.sync();
      continue;
    }
    TROUPE_CHECK(h[0] == kind_step && h[1] >= 0 && h[1] < (int64_t{1} << 31), errc::internal,
                 "serving group: rank {}: a malformed iteration header from rank 0 ({}, {})", comm.rank(), h[0], h[1]);
    serve::DpStep step;
    if (h[1] > 0) {
      tensor b = tensor::empty({h[1]}, runtime::dtype::u8);
      comm.broadcast(b, 0);
      TROUPE_CHECK(step.ParseFromString(tensor_bytes(b, h[1])), errc::internal,
                   "serving group: rank {}: an iteration from rank 0 that does not parse", comm.rank());
    }
    const auto now = clk::now();
    for (const auto& q : step.requests()) {
      if (q.rank() != comm.rank()) continue;
      const std::string id = q.id();
      const int64_t n = std::max<int64_t>(q.n(), 1);
      try {
        engine_request r;
        r.id = id;
        r.prompt.assign(q.prompt().begin(), q.prompt().end());
        r.params = decode_params(q.params(), grammars);
        r.n = n;
        r.cumulative_logprob = q.cumulative_logprob();
        r.arrival = now - std::chrono::microseconds(q.waited_us());
        r.on_event = [&report, id](const engine_event& e) { encode_event(id, e, report.add_events()); };
        eng.submit(std::move(r));
      } catch (const std::exception& e) {  // rank 0 checked it; this rank refuses it anyway: it ends here
        log::error("serving group: rank {}: request {} refused: {}", comm.rank(), id, e.what());
        for (int64_t i = 0; i < n; ++i) {
          engine_event ev;
          ev.index = i;
          ev.finished = true;
          ev.finish_reason = "error";
          ev.error = fmt::format("rank {} refused the request: {}", comm.rank(), e.what());
          ev.prompt_tokens = q.prompt_size();
          encode_event(id, ev, report.add_events());
        }
      }
    }
    for (const auto& a : step.aborts())
      if (a.rank() == comm.rank()) eng.abort(a.id());
    eng.step_or_idle();
    if (hooks.after_step) hooks.after_step(steps);
    fill_load(eng, report);
    const std::string body = report.SerializeAsString();
    tensor len = tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(body.size())}, {1});
    comm.send(len, 0, tag_report);
    if (!body.empty()) comm.send(bytes_tensor(body), 0, tag_report);
    report.Clear();
    ++steps;
  }
}

}  // namespace

}  // namespace troupe::elastic
