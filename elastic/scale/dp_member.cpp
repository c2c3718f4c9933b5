// elastic/scale/dp_member.cpp — see dp_member.h.
#include "elastic/scale/dp_member.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <cstring>

#include "parallel/ep/ep_shard.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::elastic {

namespace log = runtime::log;
using runtime::errc;
using runtime::tensor;
namespace ep = parallel::ep;

namespace {

constexpr int tag_plan = 20111;     // rank 0 -> a standby rank: a change that takes it in, or the end
constexpr int tag_weights = 20112;  // a tensor and its checksum, in the global order of invariant 3
constexpr int64_t plan_end = 0, plan_join = 1;

// XXH3-64 of the tensor's bytes: a checksum that keeps up with memory bandwidth.
int64_t checksum_of(const tensor& t) { return static_cast<int64_t>(XXH3_64bits(t.data_ptr(), t.nbytes())); }

int owner(int64_t e, int64_t E, int ranks) { return static_cast<int>(e / (E / ranks)); }

}  // namespace

dp_member::dp_member(runtime::communicator& pool, runtime::communicator& xfer, dp_comm_factory make_comm,
                     ep::ep_options ep)
    : pool_(pool), xfer_(xfer), make_comm_(std::move(make_comm)), ep_(ep) {
  TROUPE_CHECK(pool.size() == xfer.size() && pool.rank() == xfer.rank(), errc::invalid_argument,
               "dp_member: the pool ({} ranks) and its transfer communicator ({}) differ", pool.size(), xfer.size());
}

dp_member::~dp_member() {
  if (moving_.joinable()) {
    pool_.abort("the serving process is stopping");  // a move still waiting on a peer fails now
    xfer_.abort("the serving process is stopping");
    moving_.join();
  }
  dec_.reset();
  moe_.reset();
  retired_.clear();
  borrowed_.reset();
  tokens_.reset();
}

void dp_member::check_ranks(int ranks) const {
  TROUPE_CHECK(ranks >= 1 && ranks <= pool_.size(), errc::invalid_argument,
               "{} ranks: the pool has {} processes able to serve", ranks, pool_.size());
  TROUPE_CHECK(!config_.is_moe() || config_.n_experts % ranks == 0, errc::invalid_argument,
               "{} ranks do not divide the model's {} experts (each rank holds as many)", ranks, config_.n_experts);
}

void dp_member::load(const std::string& dir, int ranks) { load(parallel::model_weights::load(dir), ranks); }

void dp_member::load(parallel::model_weights full, int ranks) {
  config_ = full.config();
  check_ranks(ranks);
  TROUPE_CHECK(pool_.rank() < ranks, errc::invalid_argument, "pool rank {} is not in the first group of {} ranks",
               pool_.rank(), ranks);
  w_ = std::move(full);
  if (config_.is_moe() && ranks > 1) ep::ep_shard_weights(w_, ep::ep_placement::contiguous(config_.n_experts, ranks), pool_.rank());
  make_comms(ranks, 1);
  install(ranks, 1);
}

void dp_member::start_standby(const runtime::model_config& config) {
  config_ = config;
  ranks_ = 0;
}

runtime::communicator& dp_member::comm() {
  TROUPE_CHECK(active() && tokens_ != nullptr, errc::internal, "pool rank {} serves in no group", pool_.rank());
  return *tokens_;
}

parallel::decoder& dp_member::decoder() {
  TROUPE_CHECK(dec_ != nullptr, errc::internal, "pool rank {} holds no model", pool_.rank());
  return *dec_;
}

// The layout's communicators (invariant 5): made collectively by the new group's ranks.
void dp_member::make_comms(int ranks, int64_t layout) {
  const int me = pool_.rank();
  std::vector<int> members(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) members[static_cast<size_t>(r)] = r;
  if (ranks > 1) {
    next_tokens_ = make_comm_(members, fmt::format("serve.{}", layout));
    if (config_.is_moe()) next_borrowed_ = make_comm_(members, fmt::format("serve_weights.{}", layout));
  } else {
    next_tokens_ = std::move(runtime::make_inproc_group(1)[0]);
  }
  TROUPE_CHECK(next_tokens_ && next_tokens_->size() == ranks && next_tokens_->rank() == me, errc::internal,
               "pool rank {}: the communicator of layout {} has {} ranks, expected {}", me, layout,
               next_tokens_ ? next_tokens_->size() : 0, ranks);
}

// The layout's MoE runner over the communicators make_comms made; the old runner and communicators go.
void dp_member::install(int ranks, int64_t layout) {
  std::unique_ptr<ep::ep_serve_runner> moe;
  if (config_.is_moe()) {
    if (ranks > 1) {
      ep::ep_context c;
      c.tokens = next_tokens_.get();
      c.weights = next_borrowed_.get();
      c.placement = ep::ep_placement::contiguous(config_.n_experts, ranks);
      c.options = ep_;
      moe = std::make_unique<ep::ep_serve_runner>(std::move(c), ep::ep_serve_layout::data_parallel);
    } else {
      moe = std::make_unique<ep::ep_serve_runner>();
    }
  }
  if (!dec_) dec_ = std::make_unique<parallel::decoder>(w_);
  dec_->set_expert_parallel(moe.get());
  // The old runner stays until this member goes: /metrics may be reading its counters right now.
  if (moe_) retired_.push_back(std::move(moe_));
  moe_ = std::move(moe);
  std::unique_ptr<runtime::communicator> old_tokens = std::move(tokens_), old_borrowed = std::move(borrowed_);
  borrowed_ = std::move(next_borrowed_);
  tokens_ = std::move(next_tokens_);
  ranks_ = ranks;
  layout_ = layout;
  if (on_layout) on_layout();  // the new communicators are registered before the old ones go
}

// Invariant 3: every tensor the change moves, in one global order.
void dp_member::move_weights(int from, int to) {
  const int me = pool_.rank();
  auto send = [&](const tensor& t, int peer) {
    xfer_.send(t, peer, tag_weights);
    xfer_.send(tensor::from_vector(std::vector<int64_t>{checksum_of(t)}, {1}), peer, tag_weights);
    stats_.bytes_sent += t.nbytes();
  };
  auto recv = [&](tensor& t, int peer, const std::string& name) {
    xfer_.recv(t, peer, tag_weights);
    tensor crc = tensor::zeros({1}, runtime::dtype::i64);
    xfer_.recv(crc, peer, tag_weights);
    const int64_t want = crc.data<int64_t>()[0], got = checksum_of(t);
    TROUPE_CHECK(want == got, errc::io, "{} from rank {} to rank {}: checksum (XXH3-64) {:016x} received, {:016x} computed",
                 name, peer, me, static_cast<uint64_t>(want), static_cast<uint64_t>(got));
    stats_.bytes_received += t.nbytes();
    ++stats_.tensors_received;
  };
  // Dense parameters, to each joining rank (a joining rank's parameters() lists exactly those).
  for (int j = from; j < to; ++j) {
    const int src = (j - from) % from;
    if (me != src && me != j) continue;
    for (auto& p : w_.parameters()) {
      if (ep::ep_is_expert_param(p.name)) continue;
      if (me == src) send(p.value, j);
      else recv(p.value, src, p.name);
    }
  }
  if (!config_.is_moe()) return;
  const int64_t E = config_.n_experts;
  for (size_t l = 0; l < w_.layers.size(); ++l) {
    parallel::layer_params& L = w_.layers[l];
    if (!L.is_moe) continue;
    auto sets = ep::ep_expert_sets(L, config_);
    for (int64_t e = 0; e < E; ++e) {
      const int o = owner(e, E, from), n = owner(e, E, to);
      if (o == n || (me != o && me != n)) continue;
      for (size_t k = 0; k < sets.size(); ++k) {
        if (me == o) {
          send((*sets[k].tensors)[static_cast<size_t>(e)], n);  // read while the rank serves with it
        } else {
          tensor t = tensor::empty(sets[k].shape);
          recv(t, o, fmt::format("layer {} expert {} ({})", l, e, k == 0 ? "gate" : k == 1 ? "up" : "down"));
          incoming_.push_back({l, e, k, std::move(t)});
        }
      }
    }
  }
}

void dp_member::prepare(const serve::DpScale& plan) {
  const int me = pool_.rank();
  const int from = plan.from_ranks(), to = plan.to_ranks();
  TROUPE_CHECK(from >= 1 && to >= 1 && std::max(from, to) <= pool_.size() && me < std::max(from, to),
               errc::invalid_argument, "pool rank {}: a change from {} to {} ranks in a pool of {}", me, from, to,
               pool_.size());
  TROUPE_CHECK(!moving_.joinable(), errc::internal, "pool rank {}: a change is under way already", me);
  check_ranks(to);
  stats_ = {};
  incoming_.clear();
  error_ = nullptr;
  done_ = false;
  if (me >= from)  // a joining rank: room for the dense weights (invariant 3 fills them, then its experts)
    w_ = parallel::model_weights::allocate(config_, [](const std::string& name) { return !ep::ep_is_expert_param(name); });
  moving_ = std::thread([this, from, to, me, layout = plan.epoch()] {
    const auto t0 = std::chrono::steady_clock::now();
    try {
      move_weights(from, to);
      if (me < to) make_comms(to, layout);
    } catch (...) {
      error_ = std::current_exception();
    }
    stats_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    done_ = true;
  });
}

bool dp_member::ready() const { return done_.load(); }

std::string dp_member::move_error() const {
  if (!done_.load() || !error_) return {};
  try {
    std::rethrow_exception(error_);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "an unknown failure";
  }
}

runtime::communicator* dp_member::commit(const serve::DpScale& plan) {
  const int me = pool_.rank();
  const int from = plan.from_ranks(), to = plan.to_ranks();
  TROUPE_CHECK(moving_.joinable(), errc::internal, "pool rank {}: commit without prepare", me);
  moving_.join();
  if (error_) {
    next_tokens_.reset();
    next_borrowed_.reset();
    incoming_.clear();
    std::rethrow_exception(error_);
  }
  total_.bytes_sent += stats_.bytes_sent;
  total_.bytes_received += stats_.bytes_received;
  total_.tensors_received += stats_.tensors_received;
  total_.seconds += stats_.seconds;
  if (me >= to) {  // leaving: standby again (invariant 4)
    std::unique_ptr<runtime::communicator> old_tokens = std::move(tokens_), old_borrowed = std::move(borrowed_);
    ranks_ = to;
    layout_ = plan.epoch();
    if (on_layout) on_layout();  // no serving communicator registered any more, before it goes
    dec_.reset();
    if (moe_) retired_.push_back(std::move(moe_));
    old_tokens.reset();
    old_borrowed.reset();
    w_ = parallel::model_weights();
    log::info("rank {}: left the serving group (layout {}); {} bytes of weights sent", me, plan.epoch(),
              stats_.bytes_sent);
    return nullptr;
  }
  if (config_.is_moe()) {  // experts in and out by handle (invariant 4)
    const int64_t E = config_.n_experts;
    for (size_t l = 0; l < w_.layers.size(); ++l) {
      parallel::layer_params& L = w_.layers[l];
      if (!L.is_moe) continue;
      auto sets = ep::ep_expert_sets(L, config_);
      if (me < from)
        for (int64_t e = 0; e < E; ++e)
          if (owner(e, E, from) == me && owner(e, E, to) != me)
            for (auto& st : sets) (*st.tensors)[static_cast<size_t>(e)] = tensor();
    }
    for (auto& in : incoming_) {
      auto sets = ep::ep_expert_sets(w_.layers[in.layer], config_);
      (*sets[in.set].tensors)[static_cast<size_t>(in.expert)] = std::move(in.value);
    }
    incoming_.clear();
  }
  install(to, plan.epoch());
  log::debug("rank {}: layout {} on {} ranks; {} bytes sent, {} received ({} tensors checked) in {:.3f} s", me,
             plan.epoch(), to, stats_.bytes_sent, stats_.bytes_received, stats_.tensors_received, stats_.seconds);
  return tokens_.get();
}

runtime::communicator* dp_member::regroup(const serve::DpScale& plan) {
  prepare(plan);
  return commit(plan);
}

void dp_member::announce(const serve::DpScale& plan) {
  const std::string body = plan.SerializeAsString();
  for (int j = plan.from_ranks(); j < plan.to_ranks(); ++j) {
    pool_.send(tensor::from_vector(std::vector<int64_t>{plan_join, static_cast<int64_t>(body.size())}, {2}), j,
               tag_plan);
    tensor b = tensor::empty({static_cast<int64_t>(body.size())}, runtime::dtype::u8);
    std::memcpy(b.data_ptr(), body.data(), body.size());
    pool_.send(b, j, tag_plan);
  }
}

void dp_member::end_standby() {
  for (int j = std::max(ranks_, 1); j < pool_.size(); ++j)
    pool_.send(tensor::from_vector(std::vector<int64_t>{plan_end, 0}, {2}), j, tag_plan);
}

std::optional<serve::DpScale> dp_member::wait_standby() {
  tensor head = tensor::zeros({2}, runtime::dtype::i64);
  pool_.recv(head, 0, tag_plan);
  const int64_t kind = head.data<int64_t>()[0], n = head.data<int64_t>()[1];
  if (kind == plan_end) return std::nullopt;
  TROUPE_CHECK(kind == plan_join && n > 0 && n < (int64_t{1} << 20), errc::internal,
               "pool rank {}: a malformed message from rank 0 ({}, {} bytes)", pool_.rank(), kind, n);
  tensor b = tensor::empty({n}, runtime::dtype::u8);
  pool_.recv(b, 0, tag_plan);
  serve::DpScale plan;
  TROUPE_CHECK(plan.ParseFromString(std::string(static_cast<const char*>(b.data_ptr()), static_cast<size_t>(n))),
               errc::internal, "pool rank {}: a change of size from rank 0 that does not parse", pool_.rank());
  return plan;
}

dp_elastic dp_member::elastic() {
  dp_elastic el;
  el.pool_ranks = pool_.size();
  el.prepare = [this](const serve::DpScale& p) { prepare(p); };
  el.ready = [this] { return ready(); };
  el.move_error = [this] { return move_error(); };
  el.commit = [this](const serve::DpScale& p) { return commit(p); };
  el.announce = [this](const serve::DpScale& p) { announce(p); };
  el.check = [this](int r) { check_ranks(r); };
  el.end = [this] { end_standby(); };
  return el;
}

dp_follower_summary dp_serve_follower(dp_member& m, const parallel::text_tokenizer& tok, engine_options opts,
                                      int64_t blocks, const dp_elastic& el) {
  opts.group_member = true;
  opts.max_waiting *= std::max(1, el.pool_ranks);
  dp_follower_summary out;
  bool standby = !m.active();
  if (!standby) {
    local_executor exec(m.decoder(), blocks, opts.block_size);
    engine eng(exec, tok, opts);
    const auto res = dp_follow(eng, m.comm(), {}, el);
    out.steps += res.steps;
    standby = res.left;
  }
  while (standby) {
    const auto plan = m.wait_standby();
    if (!plan) break;
    el.prepare(*plan);  // nothing to serve meanwhile: wait for the moves
    runtime::communicator* c = el.commit(*plan);
    TROUPE_CHECK(c != nullptr, errc::internal, "a standby rank taken into a group of {} ranks got no communicator",
                 plan->to_ranks());
    ++out.joins;
    log::info("rank {}: joined the serving group (layout {}, {} ranks); {} bytes of weights received, {} tensors "
              "checked, in {:.3f} s",
              c->rank(), plan->epoch(), plan->to_ranks(), m.last_transfer().bytes_received,
              m.last_transfer().tensors_received, m.last_transfer().seconds);
    local_executor exec(m.decoder(), plan->num_blocks(), opts.block_size);
    engine eng(exec, tok, opts);
    const auto res = dp_follow(eng, *c, {}, el);
    out.steps += res.steps;
    standby = res.left;
  }
  return out;
}

}  // namespace troupe::elastic
