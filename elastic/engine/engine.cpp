// elastic/engine/engine.cpp — see engine.h.
#include "elastic/engine/engine.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "parallel/model/forward_batch.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/threads.h"

namespace troupe::elastic {

namespace log = runtime::log;
using runtime::errc;
using clk = std::chrono::steady_clock;

// ---- histogram ----------------------------------------------------------------------------

latency_histogram::latency_histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size() + 1, 0) {}

void latency_histogram::add(double seconds) {
  size_t i = 0;
  while (i < bounds.size() && seconds > bounds[i]) ++i;
  ++counts[i];
  sum += seconds;
  ++n;
}

double latency_histogram::quantile(double q) const {
  if (n == 0) return 0;
  const double want = q * static_cast<double>(n);
  int64_t acc = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    acc += counts[i];
    if (static_cast<double>(acc) >= want) return i < bounds.size() ? bounds[i] : INFINITY;
  }
  return INFINITY;
}

std::string latency_histogram::prometheus(const std::string& name, const std::string& help) const {
  std::string out = fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  int64_t acc = 0;
  for (size_t i = 0; i < bounds.size(); ++i) {
    acc += counts[i];
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds[i], acc);
  }
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, n, name, sum, name, n);
  return out;
}

std::vector<double> serving_latency_bounds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

std::string serving_gauges_text(const serving_gauges& g) {
  return fmt::format(
      "# HELP troupe_requests_waiting Requests queued.\n# TYPE troupe_requests_waiting gauge\n"
      "troupe_requests_waiting {}\n"
      "# HELP troupe_requests_running Requests in a batch.\n# TYPE troupe_requests_running gauge\n"
      "troupe_requests_running {}\n"
      "# HELP troupe_kv_cache_usage Fraction of KV blocks in use.\n# TYPE troupe_kv_cache_usage gauge\n"
      "troupe_kv_cache_usage {}\n"
      "# HELP troupe_prefix_cache_hit_rate Prompt tokens served from cached blocks.\n"
      "# TYPE troupe_prefix_cache_hit_rate gauge\ntroupe_prefix_cache_hit_rate {}\n"
      "# HELP troupe_preemptions_total Sequences preempted for KV memory.\n# TYPE troupe_preemptions_total counter\n"
      "troupe_preemptions_total {}\n"
      "# HELP troupe_generation_tokens_total Generated tokens.\n# TYPE troupe_generation_tokens_total counter\n"
      "troupe_generation_tokens_total {}\n"
      "# HELP troupe_prompt_tokens_total Prompt tokens admitted.\n# TYPE troupe_prompt_tokens_total counter\n"
      "troupe_prompt_tokens_total {}\n",
      g.waiting, g.running, g.kv_usage, g.prefix_hit_rate, g.preemptions, g.generated_tokens, g.prompt_tokens);
}

// ---- sequences ------------------------------------------------------------------------------

// The samples of one request (invariant 7): what the others wait for.
struct sample_group {
  kv_request_id leader_kv = 0;  // sample 0's blocks, while it holds them
  bool prefilled = false;       // sample 0's prompt is in its blocks (or sample 0 is gone)
};

struct engine::sequence {
  engine_request req;
  int64_t index = 0;                    // the sample
  std::shared_ptr<sample_group> group;  // n > 1
  kv_request_id kv_id = 0;
  bool allocated = false;
  std::vector<int32_t> tokens;  // prompt + generated
  int64_t prompt_len = 0;
  int64_t computed = 0;         // tokens whose KV is in the cache
  int64_t scheduled = 0;        // tokens of this iteration
  int64_t generated = 0;
  std::unique_ptr<sampler> samp;
  std::unique_ptr<stop_checker> stops;
  std::unique_ptr<parallel::token_stream_decoder> detok;
  clk::time_point arrival, last_token;
  bool got_first = false, done = false;
  std::vector<int32_t> pending_ids;  // generated since the last event
  std::vector<token_logprob> pending_lps;
  bool collect_prompt_lps = false;   // sample 0 with prompt_logprobs, until they are sent
  bool all_logits = false;           // this iteration: a logits row per scheduled token
  std::vector<token_logprob> prompt_lps;
  double cumulative_logprob = 0;
  std::optional<json_matcher> matcher;  // guided decoding
};

namespace {
int64_t local_blocks(const parallel::decoder& dec, const engine_options& o) {
  const int64_t n = o.num_blocks > 0 ? o.num_blocks
                                     : parallel::paged_kv_store::blocks_for_budget(dec.config(), o.block_size,
                                                                                   o.kv_cache_bytes);
  TROUPE_CHECK(n >= 1, errc::invalid_argument,
               "engine: a KV cache of {} bytes holds no block of {} tokens ({} bytes each); raise "
               "engine.kv_cache_memory",
               o.kv_cache_bytes, o.block_size, parallel::paged_kv_store::bytes_per_block(dec.config(), o.block_size));
  return n;
}
kv_block_hash_fn block_hash(bool prefix_caching) {
  if (prefix_caching) return kv_block_hash_fn(kv_block_hash);
  return kv_block_hash_fn([n = uint64_t{0}](uint64_t, std::span<const int32_t>) mutable {
    return ++n;  // every block unique: nothing is ever shared
  });
}
}  // namespace

engine::engine(const parallel::decoder& dec, const parallel::text_tokenizer& tok, engine_options o)
    : engine(std::make_unique<local_executor>(dec, local_blocks(dec, o), o.block_size), tok, o) {}

engine::engine(std::unique_ptr<model_executor> own, const parallel::text_tokenizer& tok, engine_options o)
    : engine(*own, tok, o) {
  own_exec_ = std::move(own);
}

engine::engine(model_executor& exec, const parallel::text_tokenizer& tok, engine_options o)
    : exec_(&exec), tok_(tok), o_(o),
      kv_(std::max<int64_t>(exec.num_blocks(), 1), exec.block_size(), block_hash(o.prefix_caching)),
      ttft_(serving_latency_bounds()), tpot_(serving_latency_bounds()) {
  o_.block_size = exec.block_size();
  o_.num_blocks = exec.num_blocks();
  TROUPE_CHECK(exec.num_blocks() >= 1, errc::invalid_argument, "engine: the executor's KV store has no block");
  TROUPE_CHECK(o.max_batch_tokens >= 1 && o.max_running >= 1 && o.max_waiting >= 1 && o.keepalive_ms >= 1,
               errc::invalid_argument,
               "engine: max_batch_tokens, max_running, max_waiting and keepalive_ms must be >= 1");
  vocab_ = exec.config().vocab_size;
  max_positions_ = exec.config().max_position_embeddings;
  stats_.kv = kv_.stats();
}

engine::~engine() { stop(); }

void engine::check_request(const engine_request& r) const {
  TROUPE_CHECK(!r.prompt.empty(), errc::invalid_argument, "request {}: the prompt is empty", r.id);
  for (size_t i = 0; i < r.prompt.size(); ++i)
    TROUPE_CHECK(r.prompt[i] >= 0 && r.prompt[i] < vocab_, errc::invalid_argument,
                 "request {}: prompt token {} at index {} is outside the vocabulary [0, {})", r.id, r.prompt[i], i,
                 vocab_);
  TROUPE_CHECK(static_cast<int64_t>(r.prompt.size()) < max_positions_, errc::invalid_argument,
               "request {}: the prompt has {} tokens; the model's context is {}", r.id, r.prompt.size(),
               max_positions_);
  TROUPE_CHECK(kv_.blocks_for(static_cast<int64_t>(r.prompt.size()) + 1) <= kv_.num_blocks(), errc::invalid_argument,
               "request {}: the prompt needs {} KV blocks of {} tokens; the cache has {} in all", r.id,
               kv_.blocks_for(static_cast<int64_t>(r.prompt.size()) + 1), kv_.block_size(), kv_.num_blocks());
  validate_sampling_params(r.params);
  for (const auto& [id, b] : r.params.logit_bias)
    TROUPE_CHECK(id < vocab_, errc::invalid_argument,
                 "request {}: logit_bias names token {}, outside the vocabulary [0, {})", r.id, id, vocab_);
  TROUPE_CHECK(r.n >= 1, errc::invalid_argument, "request {}: n = {} samples; at least 1", r.id, r.n);
  if (r.resume) {
    TROUPE_CHECK(r.n == 1 && r.resume->index >= 0, errc::invalid_argument,
                 "request {}: a resumed request is one sample with an index >= 0 (n = {}, index {})", r.id, r.n,
                 r.resume->index);
    const auto k = static_cast<int64_t>(r.resume->tokens.size());
    TROUPE_CHECK(k < r.params.max_tokens, errc::invalid_argument,
                 "request {}: resumed after {} tokens, but max_tokens is {}", r.id, k, r.params.max_tokens);
    TROUPE_CHECK(static_cast<int64_t>(r.prompt.size()) + k < max_positions_ &&
                     kv_.blocks_for(static_cast<int64_t>(r.prompt.size()) + k + 1) <= kv_.num_blocks(),
                 errc::invalid_argument, "request {}: prompt + {} resumed tokens do not fit the context or the cache",
                 r.id, k);
    for (int32_t t : r.resume->tokens)
      TROUPE_CHECK(t >= 0 && t < vocab_, errc::invalid_argument,
                   "request {}: resumed token {} is outside the vocabulary [0, {})", r.id, t, vocab_);
  }
}

void engine::submit(engine_request r) {
  check_request(r);
  if (r.arrival == clk::time_point{}) r.arrival = clk::now();
  {
    std::lock_guard<std::mutex> g(mu_);
    // A moved or resumed request was admitted by its group already: refusing it would fail it.
    if (!r.resume && !r.admitted && static_cast<int64_t>(inbox_.size() + waiting_.size()) >= o_.max_waiting)
      throw engine_busy(fmt::format("{} requests are waiting already (engine.max_waiting)", o_.max_waiting));
    inbox_.push_back(std::move(r));
  }
  cv_.notify_all();
}

void engine::abort(const std::string& id) {
  {
    std::lock_guard<std::mutex> g(mu_);
    aborts_.push_back(id);
  }
  cv_.notify_all();
}

void engine::take_inbox() {
  std::deque<engine_request> in;
  std::vector<std::string> ab;
  {
    std::lock_guard<std::mutex> g(mu_);
    in.swap(inbox_);
    ab.swap(aborts_);
  }
  for (auto& r : in) {
    std::shared_ptr<sample_group> group;
    if (r.n > 1) group = std::make_shared<sample_group>();
    std::vector<std::unique_ptr<sequence>> samples;
    try {  // all of a request's samples, or none: a failure ends that request alone
      for (int64_t i = 0; i < r.n; ++i) {
        auto s = std::make_unique<sequence>();
        s->req = r;  // each sample its own copy (its seed, its callback)
        s->req.params.seed = r.params.seed + static_cast<uint64_t>(i);
        // Sample 0 reports the prompt's logprobs; with max_tokens 0 the others only end (invariant 7).
        if (i > 0 && r.params.max_tokens > 0) s->req.params.prompt_logprobs = -1;
        s->index = i;
        s->group = group;
        s->tokens = r.prompt;
        s->prompt_len = static_cast<int64_t>(r.prompt.size());
        s->samp = std::make_unique<sampler>(s->req.params);
        s->samp->set_prompt(r.prompt);
        s->stops = std::make_unique<stop_checker>(r.params.stop);
        s->detok = std::make_unique<parallel::token_stream_decoder>(tok_);
        s->collect_prompt_lps = i == 0 && s->req.params.prompt_logprobs >= 0;
        if (s->req.params.grammar) s->matcher.emplace(s->req.params.grammar);
        s->arrival = r.arrival;
        s->kv_id = next_kv_id_++;
        if (group && i == 0) group->leader_kv = s->kv_id;
        if (r.resume) replay(*s, *r.resume);
        samples.push_back(std::move(s));
      }
    } catch (const std::exception& e) {
      log::error("engine: request {} could not be queued: {}", r.id, e.what());
      for (int64_t i = 0; i < r.n && r.on_event; ++i) {
        engine_event ev;
        ev.index = r.resume ? r.resume->index : i;
        ev.finished = true;
        ev.finish_reason = "error";
        ev.error = e.what();
        ev.prompt_tokens = static_cast<int64_t>(r.prompt.size());
        r.on_event(ev);
      }
      continue;
    }
    for (auto& s : samples) waiting_.push_back(std::move(s));
  }
  for (const auto& id : ab) {
    for (auto& s : running_)
      if (s->req.id == id && !s->done) finish(*s, "abort");
    for (auto& s : waiting_)
      if (s->req.id == id && !s->done) finish(*s, "abort");
  }
}

// Invariant 10: the sent tokens pass through what emit_token feeds, with no event and no latency.
void engine::replay(sequence& s, const engine_request::resumed& from) {
  s.index = from.index;
  s.req.params.seed = s.req.params.seed + static_cast<uint64_t>(from.index);
  s.samp = std::make_unique<sampler>(s.req.params);
  s.samp->set_prompt(s.req.prompt);
  if (from.prompt_logprobs_sent || from.index > 0) s.collect_prompt_lps = false;
  s.cumulative_logprob = from.cumulative_logprob;
  for (int32_t t : from.tokens) {
    s.tokens.push_back(t);
    ++s.generated;
    s.samp->accept(t);
    s.stops->push(s.detok->push(t));
    if (s.matcher && !s.matcher->advance(tok_.token_bytes(t)))
      TROUPE_THROW(errc::invalid_argument, "request {}: resumed token {} does not fit its JSON grammar", s.req.id, t);
  }
  s.got_first = !from.tokens.empty();
  s.last_token = clk::now() - from.last_token_age;
}

void engine::finish(sequence& s, const std::string& reason, const std::string& error) {
  if (s.done) return;
  s.done = true;
  if (s.allocated) {
    kv_.free(s.kv_id);
    s.allocated = false;
  }
  if (s.group && s.index == 0) s.group->prefilled = true;  // the other samples stop waiting for it
  engine_event e;
  if (reason == "length" || (reason == "stop" && !s.stops->stopped())) {
    // eos or length: what the stop checker held back is output after all; an incomplete UTF-8
    // character the detokenizer holds is not (invariant 9)
    e.text = s.stops->flush();
  }
  e.index = s.index;
  e.token_ids = std::move(s.pending_ids);
  e.logprobs = std::move(s.pending_lps);
  e.cumulative_logprob = s.cumulative_logprob;
  e.finished = true;
  e.finish_reason = reason;
  e.error = error;
  e.prompt_tokens = s.prompt_len;
  e.completion_tokens = s.generated;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (reason == "abort") ++stats_.aborted;
    else ++stats_.finished;
  }
  if (s.req.on_event) s.req.on_event(e);  // never under the lock: a callback may call abort()
}

void engine::emit_token(sequence& s, int32_t token, const token_logprob* lp) {
  const auto now = clk::now();
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!s.got_first) ttft_.add(std::chrono::duration<double>(now - s.arrival).count());
    else tpot_.add(std::chrono::duration<double>(now - s.last_token).count());
    ++stats_.generated_tokens;
  }
  s.got_first = true;
  s.last_token = now;
  ++s.generated;
  s.pending_ids.push_back(token);
  s.samp->accept(token);
  if (lp) {
    s.cumulative_logprob += lp->logprob;
    if (s.req.params.logprobs >= 0) s.pending_lps.push_back(*lp);
  }
  // Stop conditions: eos / stop token ids, then stop strings on the text, then length.
  const auto& p = s.req.params;
  bool eos = false;
  if (!p.ignore_eos)
    for (int32_t e : tok_.eos_ids()) eos |= token == e;
  for (int32_t t : p.stop_token_ids) eos |= token == t;
  std::string piece;
  if (!eos) {
    try {
      piece = s.detok->push(token);
    } catch (const std::exception& e) {  // e.g. an id past the tokenizer's vocabulary: this sample alone ends
      finish(s, "error", fmt::format("token {} cannot be decoded: {}", token, e.what()));
      return;
    }
  }
  const stop_chunk c = s.stops->push(piece);
  const bool length = s.generated >= p.max_tokens || static_cast<int64_t>(s.tokens.size()) >= max_positions_;
  // Empty text: bytes of a character, or text that may start a stop string — nothing to show yet.
  if (!c.text.empty()) {
    engine_event e;
    e.index = s.index;
    e.text = c.text;
    e.token_ids = std::move(s.pending_ids);
    s.pending_ids.clear();
    e.logprobs = std::move(s.pending_lps);
    s.pending_lps.clear();
    e.cumulative_logprob = s.cumulative_logprob;
    e.prompt_tokens = s.prompt_len;
    e.completion_tokens = s.generated;
    if (s.req.on_event) s.req.on_event(e);
  }
  // Guided: the value is whole and nothing may follow (invariant 9).
  bool complete = false;
  if (s.matcher && !eos) {
    if (!s.matcher->advance(tok_.token_bytes(token))) {
      finish(s, "error", fmt::format("guided decoding: token {} does not fit the JSON grammar", token));
      return;
    }
    complete = s.matcher->complete() && !s.matcher->can_continue();
  }
  if (c.stopped || eos || length || complete) finish(s, c.stopped || eos || complete ? "stop" : "length");
}

int64_t engine::waiting_tokens() const {
  int64_t n = 0;
  for (const auto& s : waiting_) n += static_cast<int64_t>(s->tokens.size());
  return n;
}

bool engine::admissible(const sequence& s) const { return !s.group || s.index == 0 || s.group->prefilled; }

const token_trie& engine::trie() {
  if (!trie_) {
    std::vector<std::string> bytes(static_cast<size_t>(vocab_));
    for (int64_t i = 0; i < vocab_ && i < tok_.vocab_size(); ++i)
      bytes[static_cast<size_t>(i)] = tok_.token_bytes(static_cast<int32_t>(i), /*skip_special=*/true);
    trie_ = std::make_unique<token_trie>(bytes);
  }
  return *trie_;
}

// The latest-arrived running sequence other than... any: freed and requeued first (invariant 3).
bool engine::preempt_one(const sequence* for_whom) {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    sequence& v = **it;
    if (v.done || !v.allocated) continue;
    if (&v == for_whom && running_.size() > 1) {
      bool other = false;
      for (auto& o : running_) other |= (o.get() != for_whom && !o->done && o->allocated);
      if (other) continue;  // prefer someone else
    }
    kv_.free(v.kv_id);
    v.allocated = false;
    v.computed = 0;
    v.prompt_lps.clear();  // collected again when it is recomputed
    v.kv_id = next_kv_id_++;
    if (v.group && v.index == 0) v.group->leader_kv = v.kv_id;  // the other samples share its new blocks
    std::lock_guard<std::mutex> g(mu_);
    ++stats_.preemptions;
    log::debug("engine: preempted {} ({} tokens) for lack of KV blocks", v.req.id, v.tokens.size());
    return true;
  }
  return false;
}

bool engine::step() {
  take_inbox();
  // Requeue preempted sequences (front, in arrival order) and drop finished ones.
  {
    std::vector<std::unique_ptr<sequence>> keep;
    std::vector<std::unique_ptr<sequence>> back;
    for (auto& s : running_) {
      if (s->done) continue;
      if (!s->allocated) back.push_back(std::move(s));
      else keep.push_back(std::move(s));
    }
    running_ = std::move(keep);
    for (auto it = back.rbegin(); it != back.rend(); ++it) waiting_.push_front(std::move(*it));
    std::deque<std::unique_ptr<sequence>> w;
    for (auto& s : waiting_)
      if (!s->done) w.push_back(std::move(s));
    waiting_ = std::move(w);
  }
  if (running_.empty() && waiting_.empty()) {
    std::lock_guard<std::mutex> g(mu_);
    stats_.waiting = 0;
    stats_.waiting_tokens = 0;
    stats_.running = 0;
    stats_.kv = kv_.stats();
    return false;
  }

  // 1. Schedule (invariant 1).
  int64_t budget = o_.max_batch_tokens;
  std::vector<sequence*> batch;
  auto schedule = [&](sequence& s, int64_t need) {
    s.scheduled = std::min(need, budget);
    s.all_logits = s.collect_prompt_lps && s.computed < s.prompt_len;
    budget -= s.scheduled;
    batch.push_back(&s);
  };
  for (auto& s : running_) {
    const int64_t need = static_cast<int64_t>(s->tokens.size()) - s->computed;
    if (budget <= 0 || need <= 0) continue;
    schedule(*s, need);
  }
  const bool admit = !o_.static_batching || running_.empty();
  for (size_t j = 0; admit && budget > 0 && j < waiting_.size() &&
                     static_cast<int64_t>(running_.size()) < o_.max_running;) {
    sequence& s = *waiting_[j];
    if (!admissible(s)) {  // a sample waiting for sample 0's prompt: the ones behind may go
      ++j;
      continue;
    }
    if (s.index > 0 && s.req.params.max_tokens == 0) {  // nothing to generate: sample 0 reported the prompt
      finish(s, "length");
      waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(j));
      continue;
    }
    kv_allocate_options ao;
    ao.use_cache = !s.collect_prompt_lps;  // prompt logprobs need every prompt position computed
    if (s.group && s.index > 0 && kv_.contains(s.group->leader_kv)) ao.share_from = s.group->leader_kv;
    const auto a = kv_.allocate(s.kv_id, s.tokens, ao);
    if (!a) break;  // KV memory: wait for blocks (no one behind overtakes)
    s.allocated = true;
    s.computed = a->cached_tokens;  // 0 without prefix caching (no hash ever matches)
    {
      std::lock_guard<std::mutex> g(mu_);
      stats_.prompt_tokens += static_cast<int64_t>(s.tokens.size());
    }
    schedule(s, static_cast<int64_t>(s.tokens.size()) - s.computed);
    running_.push_back(std::move(waiting_[j]));
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(j));
  }
  if (batch.empty()) {
    std::lock_guard<std::mutex> g(mu_);
    stats_.waiting = static_cast<int64_t>(waiting_.size());
    stats_.waiting_tokens = waiting_tokens();
    stats_.running = static_cast<int64_t>(running_.size());
    stats_.kv = kv_.stats();
    return false;  // waiting for blocks that only finishing requests can free
  }

  // 2. The model over every scheduled chunk; row_base[i]: sequence i's first logits row.
  std::vector<parallel::forward_batch_seq> seqs;
  std::vector<int64_t> row_base;
  int64_t rows = 0;
  for (sequence* s : batch) {
    seqs.push_back({std::span<const int32_t>(s->tokens).subspan(static_cast<size_t>(s->computed),
                                                                 static_cast<size_t>(s->scheduled)),
                    s->computed, kv_.block_table(s->kv_id), s->all_logits});
    row_base.push_back(rows);
    rows += s->all_logits ? s->scheduled : 1;
  }
  runtime::tensor logits;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& q : seqs) stats_.model_tokens += static_cast<int64_t>(q.tokens.size());
  }
  if (o_.group_member) {  // refused before any collective: the rank's idle pass still pairs them
    try {
      exec_->check(seqs);
    } catch (const std::exception& e) {
      log::error("engine: the model refused the batch: {}", e.what());
      for (sequence* s : batch) finish(*s, "error", e.what());
      return false;
    }
  }
  try {
    logits = exec_->execute(seqs);
  } catch (const runtime::error& e) {
    if (o_.group_member && (e.code() == errc::aborted || e.code() == errc::io)) {  // invariant 11: undone
      log::warn("engine: the group's iteration was aborted; its {} sequence(s) run again: {}", batch.size(),
                e.message());
      throw;
    }
    log::error("engine: the model step failed: {}", e.what());
    for (sequence* s : batch) finish(*s, "error", e.what());
    if (o_.group_member) throw;
    return true;
  } catch (const std::exception& e) {
    log::error("engine: the model step failed: {}", e.what());
    for (sequence* s : batch) finish(*s, "error", e.what());
    if (o_.group_member) throw;  // mid-step: the group's collectives are out of step
    return true;
  }

  // 3. Sample where a sequence's known tokens are all computed now.
  for (size_t i = 0; i < batch.size(); ++i) {
    sequence& s = *batch[i];
    if (s.done || !s.allocated) continue;  // finished, or preempted by an earlier sequence's token
    const int64_t before = s.computed;
    s.computed += s.scheduled;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (s.computed <= s.prompt_len) stats_.computed_prompt_tokens += s.scheduled;
    }
    kv_.mark_computed(s.kv_id, s.computed);
    const float* base = logits.data<float>() + row_base[i] * vocab_;
    if (s.all_logits)  // row j: the distribution of the token after position before + j
      for (int64_t j = 0; j < s.scheduled && before + j + 1 < s.prompt_len; ++j)
        s.prompt_lps.push_back(logprob_of(base + j * vocab_, vocab_, s.tokens[static_cast<size_t>(before + j + 1)],
                                          s.req.params.prompt_logprobs));
    if (s.group && s.index == 0 && s.computed >= s.prompt_len) s.group->prefilled = true;
    if (s.computed < static_cast<int64_t>(s.tokens.size())) continue;  // more prefill chunks to come
    if (s.collect_prompt_lps) {  // the whole prompt is computed: its logprobs go out first (invariant 8)
      s.collect_prompt_lps = false;
      engine_event e;
      e.index = s.index;
      e.prompt_logprobs.push_back({s.tokens[0], std::numeric_limits<float>::quiet_NaN(), {}});
      e.prompt_logprobs.insert(e.prompt_logprobs.end(), s.prompt_lps.begin(), s.prompt_lps.end());
      s.prompt_lps.clear();
      e.prompt_tokens = s.prompt_len;
      if (s.req.on_event) s.req.on_event(e);
      if (s.req.params.max_tokens == 0) {
        finish(s, "length");
        continue;
      }
    }
    const float* row = base + (s.all_logits ? s.scheduled - 1 : 0) * vocab_;
    const auto& p = s.req.params;
    const uint8_t* allowed = nullptr;
    if (s.matcher) {  // invariant 9
      json_allowed_tokens(*s.matcher, trie(), mask_);
      if (s.matcher->complete())
        for (int32_t e : tok_.eos_ids())
          if (e < vocab_) mask_[static_cast<size_t>(e)] = 1;
      allowed = mask_.data();
    }
    std::vector<int32_t> blocked;
    if (s.generated < p.min_tokens) {
      if (!p.ignore_eos) blocked = tok_.eos_ids();
      blocked.insert(blocked.end(), p.stop_token_ids.begin(), p.stop_token_ids.end());
    }
    int32_t token = 0;
    try {
      token = s.samp->sample(row, vocab_, allowed, blocked);
    } catch (const std::exception& e) {
      finish(s, "error", e.what());
      continue;
    }
    const bool want_lp = p.logprobs >= 0 || s.req.cumulative_logprob;
    token_logprob lp;
    if (want_lp) lp = logprob_of(row, vocab_, token, std::max<int64_t>(p.logprobs, 0));
    // The token's KV slot (a new block when the last is full): preempt the latest arrivals.
    while (!kv_.append_token(s.kv_id, token)) {
      if (!preempt_one(&s)) break;
      if (!s.allocated) break;  // s itself was preempted
    }
    if (!s.allocated) {  // preempted: keep the token, recompute everything later
      s.tokens.push_back(token);
      emit_token(s, token, want_lp ? &lp : nullptr);
      if (!s.done && kv_.blocks_for(static_cast<int64_t>(s.tokens.size()) + 1) > kv_.num_blocks())
        finish(s, "length");  // it could never fit again
      continue;
    }
    s.tokens.push_back(token);
    emit_token(s, token, want_lp ? &lp : nullptr);
  }
  std::lock_guard<std::mutex> g(mu_);
  ++stats_.iterations;
  stats_.waiting = static_cast<int64_t>(waiting_.size());
  stats_.waiting_tokens = waiting_tokens();
  stats_.running = static_cast<int64_t>(running_.size());
  stats_.kv = kv_.stats();
  return true;
}

bool engine::step_or_idle() {
  const bool ran = step();
  if (!ran) exec_->idle_pass();
  return ran;
}

void engine::start() {
  TROUPE_CHECK(!loop_.joinable(), errc::invalid_argument, "engine: already started");
  stop_ = false;
  loop_ = std::thread([this] {
    runtime::adopt_num_threads();  // the model step's kernels: the process's thread setting
    auto last = clk::now();
    while (!stop_) {
      bool worked = false;
      try {
        worked = step();
        if (worked) last = clk::now();
        else if (clk::now() - last > std::chrono::milliseconds(o_.keepalive_ms)) {
          keepalive();
          last = clk::now();
        }
      } catch (const std::exception& e) {
        log::error("engine: iteration failed: {}", e.what());
      }
      if (!worked) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(worked ? 0 : 20),
                     [&] { return stop_.load() || !inbox_.empty() || !aborts_.empty(); });
      }
    }
    shutdown();
  });
}

void engine::shutdown() {
  // Whatever is left ends with "abort"; then a group's other ranks stop (invariant 6).
  take_inbox();
  for (auto& s : running_) finish(*s, "abort");
  for (auto& s : waiting_) finish(*s, "abort");
  running_.clear();
  waiting_.clear();
  {
    std::lock_guard<std::mutex> g(mu_);
    stats_.waiting = 0;
    stats_.running = 0;
    stats_.kv = kv_.stats();
  }
  try {
    exec_->finish();
  } catch (const std::exception& e) {
    log::error("engine: could not end the executor: {}", e.what());
  }
}

bool engine::inbox_pending() const {
  std::lock_guard<std::mutex> g(mu_);
  return !inbox_.empty() || !aborts_.empty();
}

void engine::stop() {
  if (!loop_.joinable()) return;
  stop_ = true;
  cv_.notify_all();
  loop_.join();
}

bool engine::has_work() const {
  std::lock_guard<std::mutex> g(mu_);
  return !inbox_.empty() || !aborts_.empty() || !waiting_.empty() || !running_.empty();
}

bool engine::idle() const {
  std::lock_guard<std::mutex> g(mu_);
  return inbox_.empty() && stats_.waiting == 0 && stats_.running == 0;
}

engine_stats engine::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  return stats_;
}

std::string engine::metrics_text() const {
  std::lock_guard<std::mutex> g(mu_);
  std::string out;
  out += ttft_.prometheus("troupe_time_to_first_token_seconds", "Time from arrival to the first token.");
  out += tpot_.prometheus("troupe_time_per_output_token_seconds", "Time between consecutive output tokens.");
  serving_gauges sg;
  sg.waiting = stats_.waiting + static_cast<int64_t>(inbox_.size());
  sg.running = stats_.running;
  sg.kv_usage = stats_.kv.usage();
  sg.prefix_hit_rate = stats_.kv.hit_rate();
  sg.preemptions = stats_.preemptions;
  sg.generated_tokens = stats_.generated_tokens;
  sg.prompt_tokens = stats_.prompt_tokens;
  out += serving_gauges_text(sg);
  out += fmt::format("# HELP troupe_engine_ranks Worker ranks running each model step.\n"
                     "# TYPE troupe_engine_ranks gauge\ntroupe_engine_ranks {}\n",
                     exec_->ranks());
  return out + expert_metrics_text();
}

latency_histogram engine::ttft_histogram() const {
  std::lock_guard<std::mutex> g(mu_);
  return ttft_;
}

latency_histogram engine::tpot_histogram() const {
  std::lock_guard<std::mutex> g(mu_);
  return tpot_;
}

std::string engine::expert_metrics_text() const {
  std::string out;
  const auto loads = exec_->expert_loads();
  if (!loads.empty()) {
    out += "# HELP troupe_expert_load_rows_total Token rows routed to each expert (top-k), by MoE layer.\n"
           "# TYPE troupe_expert_load_rows_total counter\n";
    for (const auto& [layer, rows] : loads)
      for (size_t e = 0; e < rows.size(); ++e)
        out += fmt::format("troupe_expert_load_rows_total{{layer=\"{}\",expert=\"{}\"}} {}\n", layer, e, rows[e]);
    out += fmt::format("# HELP troupe_expert_rank_max_over_mean Rows per rank of the last step's expert-parallel "
                       "plans: max / mean (1 = balanced).\n# TYPE troupe_expert_rank_max_over_mean gauge\n"
                       "troupe_expert_rank_max_over_mean {}\n",
                       exec_->expert_balance());
  }
  return out;
}

}  // namespace troupe::elastic
