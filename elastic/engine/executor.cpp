// elastic/engine/executor.cpp — see executor.h.
#include "elastic/engine/executor.h"

#include "parallel/ep/ep_serve_runner.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::elastic {

namespace log = runtime::log;
using runtime::errc;
using runtime::tensor;

namespace {

constexpr int64_t kind_end = 0, kind_step = 1, kind_idle = 2, kind_sync = 3;

const parallel::ep::ep_serve_runner* serve_runner(const parallel::decoder& dec) {
  return dynamic_cast<const parallel::ep::ep_serve_runner*>(dec.expert_parallelism());
}

// A step as it travels: per sequence (tokens, start, blocks), then every token, then every block id.
struct wire_step {
  std::vector<int64_t> head;  // kind, sequences, tokens, blocks
  std::vector<int64_t> body;
};

wire_step pack(std::span<const parallel::forward_batch_seq> seqs) {
  wire_step w;
  int64_t ntok = 0, nblk = 0;
  for (const auto& s : seqs) {
    w.body.push_back(static_cast<int64_t>(s.tokens.size()));
    w.body.push_back(s.start);
    w.body.push_back(static_cast<int64_t>(s.block_table.size()));
    ntok += static_cast<int64_t>(s.tokens.size());
    nblk += static_cast<int64_t>(s.block_table.size());
  }
  for (const auto& s : seqs) w.body.insert(w.body.end(), s.tokens.begin(), s.tokens.end());
  for (const auto& s : seqs) w.body.insert(w.body.end(), s.block_table.begin(), s.block_table.end());
  w.head = {kind_step, static_cast<int64_t>(seqs.size()), ntok, nblk};
  return w;
}

}  // namespace

int64_t agree_num_blocks(runtime::communicator& comm, int64_t mine) {
  // min = -max(-x): the communicators reduce with sum and max.
  tensor t = tensor::from_vector(std::vector<int64_t>{-mine}, {1});
  comm.all_reduce(t, runtime::reduce_op::max);
  return -t.data<int64_t>()[0];
}

namespace {
// agree_num_blocks, then the same check on every rank (so no rank fails alone).
int64_t agreed_blocks(runtime::communicator& comm, int64_t mine) {
  const int64_t n = agree_num_blocks(comm, mine);
  TROUPE_CHECK(n >= 1, errc::invalid_argument,
               "serving group: rank {}: some rank's KV cache budget holds no block (the group's minimum is {}); "
               "raise engine.kv_cache_memory",
               comm.rank(), n);
  return n;
}
}  // namespace

// ---- one rank ---------------------------------------------------------------------------------

local_executor::local_executor(const parallel::decoder& dec, int64_t num_blocks, int64_t block_size)
    : dec_(dec), store_(dec.config(), num_blocks, block_size) {}

tensor local_executor::execute(std::span<const parallel::forward_batch_seq> seqs) {
  return parallel::forward_batch(dec_, seqs, store_);
}

void local_executor::idle_pass() { parallel::forward_batch_idle(dec_); }

void local_executor::check(std::span<const parallel::forward_batch_seq> seqs) const {
  parallel::check_forward_batch(dec_, seqs, store_);
}

std::map<int64_t, std::vector<int64_t>> local_executor::expert_loads() const {
  const auto* r = serve_runner(dec_);
  return r ? r->expert_loads() : std::map<int64_t, std::vector<int64_t>>{};
}

double local_executor::expert_balance() const {
  const auto* r = serve_runner(dec_);
  return r ? r->last_max_over_mean() : 1.0;
}

// ---- a group: rank 0 ----------------------------------------------------------------------------

group_executor::group_executor(const parallel::decoder& dec, int64_t num_blocks, int64_t block_size,
                               runtime::communicator& comm, group_hooks hooks)
    : local_executor(dec, agreed_blocks(comm, num_blocks), block_size), comm_(comm), hooks_(std::move(hooks)) {
  TROUPE_CHECK(comm.rank() == 0, errc::invalid_argument,
               "serving group: the engine's executor must be the group's rank 0, not rank {}", comm.rank());
}

group_executor::~group_executor() {
  try {
    finish();
  } catch (const std::exception& e) {
    log::warn("serving group: could not tell the other ranks to stop: {}", e.what());
  }
}

bool group_executor::broken() const {
  std::lock_guard<std::mutex> g(mu_);
  return !broken_.empty();
}

std::string group_executor::broken_reason() const {
  std::lock_guard<std::mutex> g(mu_);
  return broken_;
}

void group_executor::send_or_break(tensor& t) {
  try {
    comm_.broadcast(t, 0);
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> g(mu_);
    if (broken_.empty()) broken_ = e.what();
    throw;
  }
}

tensor group_executor::execute(std::span<const parallel::forward_batch_seq> seqs) {
  TROUPE_CHECK(!finished_, errc::invalid_argument, "serving group: a step after finish()");
  const std::string why = broken_reason();
  TROUPE_CHECK(why.empty(), errc::aborted, "serving group: broken since an earlier step: {}", why);
  parallel::check_forward_batch(dec_, seqs, store_);  // a refused batch never leaves rank 0
  wire_step w = pack(seqs);
  tensor head = tensor::from_vector(w.head, {4});
  send_or_break(head);
  if (!w.body.empty()) {
    tensor body = tensor::from_vector(w.body, {static_cast<int64_t>(w.body.size())});
    send_or_break(body);
  }
  try {
    tensor logits = local_executor::execute(seqs);
    if (hooks_.after_step) hooks_.after_step(steps_);
    ++steps_;
    if (hooks_.want_sync && hooks_.want_sync()) {
      tensor head = tensor::from_vector(std::vector<int64_t>{kind_sync, 0, 0, 0}, {4});
      send_or_break(head);
      if (hooks_.sync) hooks_.sync();
    }
    return logits;
  } catch (const std::exception& e) {  // after the step was sent: the group is out of step
    std::lock_guard<std::mutex> g(mu_);
    if (broken_.empty()) broken_ = e.what();
    throw;
  }
}

void group_executor::keepalive() {
  if (finished_ || broken()) return;
  tensor head = tensor::from_vector(std::vector<int64_t>{kind_idle, 0, 0, 0}, {4});
  send_or_break(head);
}

void group_executor::finish() {
  if (finished_) return;
  finished_ = true;
  if (broken()) return;  // the others left (or will, on their communicator's error)
  tensor head = tensor::from_vector(std::vector<int64_t>{kind_end, 0, 0, 0}, {4});
  comm_.broadcast(head, 0);
}

// ---- a group: the other ranks -------------------------------------------------------------------

int64_t follow_group(const parallel::decoder& dec, int64_t num_blocks, int64_t block_size,
                     runtime::communicator& comm, const group_hooks& hooks) {
  TROUPE_CHECK(comm.rank() != 0, errc::invalid_argument, "serving group: rank 0 hosts the engine; it does not follow");
  parallel::paged_kv_store store(dec.config(), agreed_blocks(comm, num_blocks), block_size);
  parallel::forward_batch_options fo;
  fo.no_logits = true;
  int64_t steps = 0;
  for (;;) {
    tensor head = tensor::zeros({4}, runtime::dtype::i64);
    comm.broadcast(head, 0);
    const int64_t* h = head.data<int64_t>();
    if (h[0] == kind_end) return steps;
    if (h[0] == kind_idle) continue;
    if (h[0] == kind_sync) {
      if (hooks.sync) hooks.sync();
      continue;
    }
    TROUPE_CHECK(h[0] == kind_step && h[1] >= 0 && h[2] >= 0 && h[3] >= 0, errc::internal,
                 "serving group: rank {}: a malformed step header from rank 0 ({}, {}, {}, {})", comm.rank(), h[0],
                 h[1], h[2], h[3]);
    const int64_t n = h[1], ntok = h[2], nblk = h[3], len = 3 * n + ntok + nblk;
    tensor body = tensor::zeros({std::max<int64_t>(len, 1)}, runtime::dtype::i64);
    if (len > 0) comm.broadcast(body, 0);
    const int64_t* b = body.data<int64_t>();
    std::vector<int32_t> tokens(static_cast<size_t>(ntok)), blocks(static_cast<size_t>(nblk));
    for (int64_t i = 0; i < ntok; ++i) tokens[static_cast<size_t>(i)] = static_cast<int32_t>(b[3 * n + i]);
    for (int64_t i = 0; i < nblk; ++i) blocks[static_cast<size_t>(i)] = static_cast<int32_t>(b[3 * n + ntok + i]);
    std::vector<parallel::forward_batch_seq> seqs(static_cast<size_t>(n));
    int64_t to = 0, bo = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t nt = b[3 * i], st = b[3 * i + 1], nb = b[3 * i + 2];
      TROUPE_CHECK(nt >= 0 && nb >= 0 && to + nt <= ntok && bo + nb <= nblk, errc::internal,
                   "serving group: rank {}: sequence {} of a step from rank 0 overruns its body", comm.rank(), i);
      seqs[static_cast<size_t>(i)] = {std::span<const int32_t>(tokens).subspan(static_cast<size_t>(to),
                                                                               static_cast<size_t>(nt)),
                                      st, std::span<const int32_t>(blocks).subspan(static_cast<size_t>(bo),
                                                                                   static_cast<size_t>(nb))};
      to += nt;
      bo += nb;
    }
    parallel::forward_batch(dec, seqs, store, fo);  // rank 0 checked it: any error here is the group's end
    if (hooks.after_step) hooks.after_step(steps);
    ++steps;
  }
}

}  // namespace troupe::elastic
