// elastic/scale/dp_member.cpp — see dp_member.h.
#include "elastic/scale/dp_member.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <cstring>

#include "parallel/ep/ep_shard.h"
#include "runtime/io/safetensors.h"
#include "runtime/shared_weights.h"
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

int index_of(const google::protobuf::RepeatedField<int32_t>& list, int x) {
  for (int i = 0; i < list.size(); ++i)
    if (list[i] == x) return i;
  return -1;
}

int index_of(const std::vector<int>& list, int x) {
  const auto it = std::find(list.begin(), list.end(), x);
  return it == list.end() ? -1 : static_cast<int>(it - list.begin());
}

// "model.layers.3.block_sparse_moe.experts.5.w1.weight" -> (3, 5); (-1, -1) when it is no expert's.
std::pair<int64_t, int64_t> layer_and_expert(const std::string& name) {
  auto number_after = [&](const std::string& key) -> int64_t {
    const auto at = name.find(key);
    if (at == std::string::npos) return -1;
    size_t i = at + key.size();
    int64_t v = 0;
    bool any = false;
    for (; i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i) v = v * 10 + (name[i] - '0'), any = true;
    return any ? v : -1;
  };
  return {number_after("layers."), number_after("experts.")};
}

}  // namespace

dp_weight_memory dp_weight_memory_from(const std::string& name) {
  if (name.empty() || name == "shared") return dp_weight_memory::shared;
  if (name == "copy") return dp_weight_memory::copy;
  if (name == "reallocate") return dp_weight_memory::reallocate;
  TROUPE_THROW(errc::invalid_argument, "weight memory '{}' is not one of shared, copy, reallocate", name);
}

dp_member::dp_member(runtime::communicator& pool, runtime::communicator& xfer, dp_comm_factory make_comm,
                     ep::ep_options ep, dp_weight_memory memory, dp_moves_factory make_moves)
    : pool_(pool),
      xfer_(xfer),
      make_comm_(std::move(make_comm)),
      make_moves_(std::move(make_moves)),
      ep_(ep),
      memory_(memory) {
  TROUPE_CHECK(pool.size() == xfer.size() && pool.rank() == xfer.rank(), errc::invalid_argument,
               "dp_member: the pool ({} ranks) and its transfer communicator ({}) differ", pool.size(), xfer.size());
  for (int r = 0; r < pool.size(); ++r) pool_members_.push_back(r);
}

void dp_member::release_later(std::vector<tensor> given, std::unique_ptr<runtime::communicator> comm) {
  if (releasing_.joinable()) releasing_.join();
  if (given.empty() && !comm) return;
  releasing_ = std::thread([v = std::move(given), c = std::move(comm)]() mutable {
    v.clear();
    c.reset();
  });
}

dp_member::~dp_member() {
  if (releasing_.joinable()) releasing_.join();
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
  const int alive = pool_alive();
  const int known = static_cast<int>(pool_members().size());
  TROUPE_CHECK(ranks >= 1 && ranks <= alive, errc::invalid_argument,
               "{} ranks: the pool has {} processes able to serve{}", ranks, alive,
               alive < known ? fmt::format(" ({} lost)", known - alive) : std::string());
  TROUPE_CHECK(!config_.is_moe() || config_.n_experts % ranks == 0, errc::invalid_argument,
               "{} ranks do not divide the model's {} experts (each rank holds as many)", ranks, config_.n_experts);
}

void dp_member::load(const std::string& dir, int ranks) {
  dir_ = dir;
  load_shard(parallel::model_weights::load(dir), ranks);
}

void dp_member::load(parallel::model_weights full, int ranks) {
  source_ = std::make_shared<parallel::model_weights>(full);
  load_shard(std::move(full), ranks);
}

void dp_member::load_shard(parallel::model_weights full, int ranks) {
  config_ = full.config();
  check_ranks(ranks);
  TROUPE_CHECK(pool_.rank() < ranks, errc::invalid_argument, "pool rank {} is not in the first group of {} ranks",
               pool_.rank(), ranks);
  w_ = std::move(full);
  std::vector<int> members(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) members[static_cast<size_t>(r)] = r;
  std::vector<int> placement;
  if (config_.is_moe()) placement = ep::ep_placement::contiguous(config_.n_experts, ranks).native;
  if (config_.is_moe() && ranks > 1) ep::ep_shard_weights(w_, ep::ep_placement{ranks, placement}, pool_.rank());
  if (memory_ == dp_weight_memory::shared)  // invariant 9: one tensor at a time, into a memfd of its own
    for (auto& p : w_.parameters()) p.value = runtime::shared_weights_copy(p.value);
  make_comms(xfer_, members, 1);
  install(members, placement, 1);
}

void dp_member::start_standby_from(const std::string& dir, const runtime::model_config& config) {
  dir_ = dir;
  start_standby(config);
}

int dp_member::pool_alive() const {
  std::lock_guard<std::mutex> g(pool_mu_);
  int alive = 0;
  for (int r : pool_members_) alive += index_of(lost_, r) < 0 ? 1 : 0;
  return alive;
}

std::vector<int> dp_member::pool_members() const {
  std::lock_guard<std::mutex> g(pool_mu_);
  return pool_members_;
}

void dp_member::add_standby(int pool_rank) {
  std::lock_guard<std::mutex> g(pool_mu_);
  if (pool_rank < 0 || index_of(pool_members_, pool_rank) >= 0) return;
  pool_members_.insert(std::upper_bound(pool_members_.begin(), pool_members_.end(), pool_rank), pool_rank);
}

void dp_member::mark_lost(int pool_rank) {
  std::lock_guard<std::mutex> g(pool_mu_);
  if (pool_rank >= 0 && index_of(lost_, pool_rank) < 0) lost_.push_back(pool_rank);
}

std::vector<int> dp_member::lost() const {
  std::lock_guard<std::mutex> g(pool_mu_);
  return lost_;
}

serve::DpScale dp_member::plan(int target) const {
  check_ranks(target);
  const int P = static_cast<int>(members_.size());
  serve::DpScale p;
  p.set_from_ranks(P);
  p.set_to_ranks(target);
  const std::vector<int> pool = pool_members();
  p.set_pool_ranks(static_cast<int>(pool.size()));
  for (int m : members_) p.add_from_members(m);
  for (int i = 0; i < std::min(P, target); ++i) p.add_to_members(members_[static_cast<size_t>(i)]);
  const std::vector<int> gone = lost();
  for (size_t k = 0; k < pool.size() && p.to_members_size() < target; ++k)  // joiners: the lowest standby ranks
    if (index_of(members_, pool[k]) < 0 && index_of(gone, pool[k]) < 0) p.add_to_members(pool[k]);
  TROUPE_CHECK(p.to_members_size() == target, errc::invalid_argument,
               "{} ranks: only {} processes of the pool are alive", target, p.to_members_size());
  if (config_.is_moe()) {
    for (int o : placement_) p.add_from_placement(o);
    for (int o : ep::ep_placement::contiguous(config_.n_experts, target).native) p.add_placement(o);
  }
  return p;
}

serve::DpScale dp_member::plan_recovery(const std::vector<int>& lost_ranks) const {
  serve::DpScale p;
  p.set_pool_ranks(static_cast<int>(pool_members().size()));
  for (int m : members_) p.add_from_members(m);
  for (int m : members_)
    if (index_of(lost_ranks, m) < 0) p.add_to_members(m);
  for (int m : lost_ranks) p.add_lost(m);
  p.set_from_ranks(static_cast<int>(members_.size()));
  p.set_to_ranks(p.to_members_size());
  TROUPE_CHECK(p.to_members_size() >= 1 && p.to_members(0) == pool_.rank(), errc::internal,
               "a recovery must keep rank 0 (pool rank {} plans it)", pool_.rank());
  if (config_.is_moe()) {  // survivors keep theirs; a lost rank's experts go to whoever holds fewest
    const int M = p.to_members_size();
    std::vector<int> out(placement_.size(), -1), count(static_cast<size_t>(M), 0);
    for (size_t e = 0; e < placement_.size(); ++e) {
      const int g = index_of(p.to_members(), members_[static_cast<size_t>(placement_[e])]);
      if (g >= 0) out[e] = g, ++count[static_cast<size_t>(g)];
    }
    for (size_t e = 0; e < out.size(); ++e) {
      if (out[e] >= 0) continue;
      const int g = static_cast<int>(std::min_element(count.begin(), count.end()) - count.begin());
      out[e] = g;
      ++count[static_cast<size_t>(g)];
    }
    for (int o : placement_) p.add_from_placement(o);
    for (int o : out) p.add_placement(o);
  }
  return p;
}

void dp_member::start_standby(const runtime::model_config& config) {
  config_ = config;
  members_.clear();
}

runtime::communicator& dp_member::comm() {
  TROUPE_CHECK(active() && tokens_ != nullptr, errc::internal, "pool rank {} serves in no group", pool_.rank());
  return *tokens_;
}

std::vector<runtime::communicator*> dp_member::group_comms() {
  std::vector<runtime::communicator*> out;
  if (moves_) out.push_back(moves_.get());
  if (!active()) return out;
  if (tokens_) out.push_back(tokens_.get());
  if (borrowed_) out.push_back(borrowed_.get());
  return out;
}

std::vector<int> dp_member::watched() const {
  std::vector<int> out = members_;
  if (change_) {
    for (int m : change_->from_members())
      if (index_of(out, m) < 0) out.push_back(m);
    for (int m : change_->to_members())
      if (index_of(out, m) < 0) out.push_back(m);
  }
  return out;
}

parallel::decoder& dp_member::decoder() {
  TROUPE_CHECK(dec_ != nullptr, errc::internal, "pool rank {} holds no model", pool_.rank());
  return *dec_;
}

// The layout's communicators (invariant 5): made collectively by the new group's ranks.
void dp_member::make_comms(runtime::communicator& via, const std::vector<int>& members, int64_t layout) {
  const int me = index_of(members, pool_.rank());
  const int ranks = static_cast<int>(members.size());
  if (ranks > 1) {
    next_tokens_ = make_comm_(via, members, fmt::format("serve.{}", layout));
    if (config_.is_moe()) next_borrowed_ = make_comm_(via, members, fmt::format("serve_weights.{}", layout));
  } else {
    next_tokens_ = std::move(runtime::make_inproc_group(1)[0]);
  }
  TROUPE_CHECK(next_tokens_ && next_tokens_->size() == ranks && next_tokens_->rank() == me, errc::internal,
               "pool rank {}: the communicator of layout {} has {} ranks, expected {}", me, layout,
               next_tokens_ ? next_tokens_->size() : 0, ranks);
}

// The layout's MoE runner over the communicators make_comms made; the old runner and communicators go.
void dp_member::install(const std::vector<int>& members, const std::vector<int>& placement, int64_t layout) {
  const int ranks = static_cast<int>(members.size());
  std::unique_ptr<ep::ep_serve_runner> moe;
  if (config_.is_moe()) {
    if (ranks > 1) {
      ep::ep_context c;
      c.tokens = next_tokens_.get();
      c.weights = next_borrowed_.get();
      c.placement = ep::ep_placement{ranks, placement};
      c.placement.validate();
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
  members_ = members;
  placement_ = placement;
  layout_ = layout;
  if (on_layout) on_layout();  // the new communicators are registered before the old ones go
}

// Invariant 3: every tensor the change moves, in one global order, grouped by (sender, receiver) pair in
// the order each pair first appears. A pair is one exchange: the sender's headers for all its tensors
// (each with its shared memory's handle, when it has one: invariant 9), the receiver's answer of which it
// mapped, then the checksums and bytes of the others, in order.
void dp_member::move_weights(const serve::DpScale& plan) {
  const int me = pool_.rank();
  runtime::communicator& xfer = moves_ ? *moves_ : xfer_;
  const auto& F = plan.from_members();
  const auto& T = plan.to_members();
  struct item {
    int src, dst;
    tensor* value;            // the sender's tensor, or the receiver's slot (may be undefined)
    runtime::shape_t shape;   // what the receiver expects
    std::string name;
    int64_t layer = -1, expert = -1;
    size_t set = 0;           // a moved expert's gate, up or down
  };
  std::vector<item> items;
  // Dense parameters, to each joining rank (a joining rank's parameters() lists exactly those).
  for (int k = F.size(); k < T.size(); ++k) {
    const int j = T[k], src = F[(k - F.size()) % F.size()];
    if (me != src && me != j) continue;
    for (auto& p : w_.parameters()) {
      if (ep::ep_is_expert_param(p.name)) continue;
      items.push_back({src, j, &p.value, p.value.shape(), p.name});
    }
  }
  std::vector<tensor> expert_slots;  // the receiver's buffers for experts, kept until incoming_ takes them
  if (config_.is_moe()) {
    const int64_t E = config_.n_experts;
    size_t receiving = 0;
    for (int pass = 0; pass < 2; ++pass) {  // count, then fill (expert_slots must not move once pointed at)
      if (pass == 1) expert_slots.resize(receiving);
      size_t slot = 0;
      for (size_t l = 0; l < w_.layers.size(); ++l) {
        parallel::layer_params& L = w_.layers[l];
        if (!L.is_moe) continue;
        auto sets = ep::ep_expert_sets(L, config_);
        for (int64_t e = 0; e < E; ++e) {
          const int o = F[plan.from_placement(static_cast<int>(e))], n = T[plan.placement(static_cast<int>(e))];
          if (o == n || (me != o && me != n)) continue;
          for (size_t k = 0; k < sets.size(); ++k) {
            if (me == n && pass == 0) ++receiving;
            if (pass == 0) continue;
            tensor* v = me == o ? &(*sets[k].tensors)[static_cast<size_t>(e)] : &expert_slots[slot++];
            items.push_back({o, n, v, sets[k].shape,
                             fmt::format("layer {} expert {} ({})", l, e, k == 0 ? "gate" : k == 1 ? "up" : "down"),
                             static_cast<int64_t>(l), e, k});
          }
        }
      }
    }
  }
  std::vector<std::pair<int, int>> pairs;  // in the order each first appears
  for (const auto& it : items)
    if (std::find(pairs.begin(), pairs.end(), std::make_pair(it.src, it.dst)) == pairs.end())
      pairs.emplace_back(it.src, it.dst);
  for (const auto& [src, dst] : pairs) {
    std::vector<item*> mine;
    for (auto& it : items)
      if (it.src == src && it.dst == dst) mine.push_back(&it);
    const int64_t n = static_cast<int64_t>(mine.size());
    tensor heads = tensor::zeros({n, 8}, runtime::dtype::i64), mapped = tensor::zeros({n}, runtime::dtype::i64);
    int64_t* h = heads.data<int64_t>();
    int64_t* m = mapped.data<int64_t>();
    if (me == src) {
      bool any = false;
      for (int64_t i = 0; i < n; ++i)
        if (memory_ == dp_weight_memory::shared)
          if (const auto sh = runtime::shared_weights_handle(*mine[static_cast<size_t>(i)]->value)) {
            const int64_t row[8] = {1, static_cast<int64_t>(sh->boot[0]), static_cast<int64_t>(sh->boot[1]), sh->pid,
                                    sh->fd, sh->bytes, sh->dev, sh->ino};
            std::copy(row, row + 8, h + 8 * i);
            any = true;
          }
      xfer.send(heads, dst, tag_weights);
      if (any) xfer.recv(mapped, dst, tag_weights);
      std::vector<int64_t> sums;
      for (int64_t i = 0; i < n; ++i)
        if (m[i] != 1) sums.push_back(checksum_of(*mine[static_cast<size_t>(i)]->value));
      if (!sums.empty()) xfer.send(tensor::from_vector(sums, {static_cast<int64_t>(sums.size())}), dst, tag_weights);
      for (int64_t i = 0; i < n; ++i) {
        if (m[i] == 1) continue;
        const tensor& t = *mine[static_cast<size_t>(i)]->value;  // read while the rank serves with it
        xfer.send(t, dst, tag_weights);
        stats_.bytes_sent += t.nbytes();
      }
      continue;
    }
    xfer.recv(heads, src, tag_weights);
    bool any = false;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* r = h + 8 * i;
      if (r[0] != 1) continue;
      any = true;
      if (memory_ != dp_weight_memory::shared) continue;
      runtime::shared_weights_handle_t sh;
      sh.boot[0] = static_cast<uint64_t>(r[1]);
      sh.boot[1] = static_cast<uint64_t>(r[2]);
      sh.pid = r[3];
      sh.fd = r[4];
      sh.bytes = r[5];
      sh.dev = r[6];
      sh.ino = r[7];
      item& it = *mine[static_cast<size_t>(i)];
      if (auto got = runtime::shared_weights_map(sh, it.shape, runtime::dtype::f32)) {  // the sender's very pages
        *it.value = std::move(*got);
        m[i] = 1;
        stats_.bytes_mapped += it.value->nbytes();
        ++stats_.tensors_mapped;
        ++stats_.tensors_received;
      }
    }
    if (any) xfer.send(mapped, src, tag_weights);
    int64_t unmapped = 0;
    for (int64_t i = 0; i < n; ++i) unmapped += m[i] == 1 ? 0 : 1;
    tensor sums = tensor::zeros({std::max<int64_t>(unmapped, 1)}, runtime::dtype::i64);
    if (unmapped > 0) xfer.recv(sums, src, tag_weights);
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (m[i] == 1) continue;
      item& it = *mine[static_cast<size_t>(i)];
      tensor& t = *it.value;
      if (!t.defined()) t = tensor::empty(it.shape);
      xfer.recv(t, src, tag_weights);
      const int64_t want = sums.data<int64_t>()[k++], got = checksum_of(t);
      TROUPE_CHECK(want == got, errc::io,
                   "{} from rank {} to rank {}: checksum (XXH3-64) {:016x} received, {:016x} computed", it.name, src,
                   me, static_cast<uint64_t>(want), static_cast<uint64_t>(got));
      if (memory_ == dp_weight_memory::shared) t = runtime::shared_weights_copy(t);  // shareable onwards
      stats_.bytes_received += t.nbytes();
      ++stats_.tensors_received;
    }
  }
  for (auto& it : items)
    if (it.dst == me && it.expert >= 0) incoming_.push_back({static_cast<size_t>(it.layer), it.expert, it.set, std::move(*it.value)});
}

// The plan's members and placement are consistent with each other and with this member's layout.
void dp_member::check_plan(const serve::DpScale& plan) const {
  const int me = pool_.rank();
  const auto& F = plan.from_members();
  const auto& T = plan.to_members();
  bool ok = F.size() == plan.from_ranks() && T.size() == plan.to_ranks() && !F.empty() && !T.empty() &&
            (!config_.is_moe() || plan.placement_size() == config_.n_experts) &&
            (index_of(F, me) >= 0 || index_of(T, me) >= 0);
  for (int p : plan.placement()) ok = ok && p >= 0 && p < T.size();
  for (int m : T) ok = ok && m >= 0;  // a rank this one has not met yet is met when it is first sent to
  if (config_.is_moe()) ok = ok && plan.from_placement_size() == config_.n_experts;
  for (int p : plan.from_placement()) ok = ok && p >= 0 && p < F.size();
  if (index_of(F, me) >= 0)
    ok = ok && std::vector<int>(F.begin(), F.end()) == members_ &&
         std::vector<int>(plan.from_placement().begin(), plan.from_placement().end()) == placement_;
  TROUPE_CHECK(ok, errc::invalid_argument,
               "pool rank {}: a change from {} to {} ranks ({} to {} members, {} placed experts) that does not fit its "
               "layout of {} ranks in a pool of {}",
               me, plan.from_ranks(), plan.to_ranks(), F.size(), T.size(), plan.placement_size(), members_.size(),
               pool_.size());
}

void dp_member::prepare(const serve::DpScale& plan) {
  const int me = pool_.rank();
  check_plan(plan);
  TROUPE_CHECK(!moving_.joinable(), errc::internal, "pool rank {}: a change is under way already", me);
  // (rank 0 checked the size against the pool when it planned; a loss since then gives the change up)
  stats_ = {};
  incoming_.clear();
  error_ = nullptr;
  done_ = false;
  if (index_of(plan.from_members(), me) < 0) {  // a joining rank: room for the dense weights (invariant 3 fills
    w_ = parallel::model_weights::allocate(    // them, then its experts), untouched: mapped pages may replace it
        config_, [](const std::string& name) { return !ep::ep_is_expert_param(name); }, /*zero_fill=*/false);
    dec_ = std::make_unique<parallel::decoder>(w_);  // so that its executor can be made while the weights move
  }
  const std::vector<int> to(plan.to_members().begin(), plan.to_members().end());
  change_ = plan;
  if (make_moves_) {  // invariant 11: registered (on_layout) before anything can wait on a peer
    moves_ = make_moves_(fmt::format("moves.{}", plan.epoch()));
    if (on_layout) on_layout();
  }
  moving_ = std::thread([this, plan, to, me, layout = plan.epoch()] {
    const auto t0 = std::chrono::steady_clock::now();
    try {
      move_weights(plan);
      if (index_of(to, me) >= 0) make_comms(moves_ ? *moves_ : xfer_, to, layout);
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
  total_.bytes_mapped += stats_.bytes_mapped;
  total_.tensors_received += stats_.tensors_received;
  total_.tensors_mapped += stats_.tensors_mapped;
  total_.seconds += stats_.seconds;
  const std::vector<int> to(plan.to_members().begin(), plan.to_members().end());
  // The change is this rank's layout now: its moves communicator is unregistered (by the on_layout
  // below) before it goes, off this thread.
  std::unique_ptr<runtime::communicator> old_moves = std::move(moves_);
  change_.reset();
  if (index_of(to, me) < 0) {  // leaving: standby again (invariant 4)
    layout_ = plan.epoch();
    leave_group(to, std::vector<int>(plan.placement().begin(), plan.placement().end()));
    release_later({}, std::move(old_moves));
    log::info("rank {}: left the serving group (layout {}); {} bytes of weights sent", me, plan.epoch(),
              stats_.bytes_sent);
    return nullptr;
  }
  std::vector<tensor> given;  // experts given away: unmapped off the serving thread, after the switch
  if (config_.is_moe()) {  // experts in and out by handle (invariant 4)
    const int64_t E = config_.n_experts;
    const auto& F = plan.from_members();
    for (size_t l = 0; l < w_.layers.size(); ++l) {
      parallel::layer_params& L = w_.layers[l];
      if (!L.is_moe) continue;
      auto sets = ep::ep_expert_sets(L, config_);
      for (int64_t e = 0; e < E; ++e)
        if (F[plan.from_placement(static_cast<int>(e))] == me && to[static_cast<size_t>(plan.placement(static_cast<int>(e)))] != me)
          for (auto& st : sets) given.push_back(std::move((*st.tensors)[static_cast<size_t>(e)]));
    }
    if (memory_ == dp_weight_memory::reallocate)  // the baseline: every expert kept gets a new buffer
      for (size_t l = 0; l < w_.layers.size(); ++l) {
        if (!w_.layers[l].is_moe) continue;
        for (auto& st : ep::ep_expert_sets(w_.layers[l], config_))
          for (auto& t : *st.tensors)
            if (t.defined()) t = t.clone();
      }
    for (auto& in : incoming_) {
      auto sets = ep::ep_expert_sets(w_.layers[in.layer], config_);
      (*sets[in.set].tensors)[static_cast<size_t>(in.expert)] = std::move(in.value);
    }
    incoming_.clear();
  }
  install(to, std::vector<int>(plan.placement().begin(), plan.placement().end()), plan.epoch());
  release_later(std::move(given), std::move(old_moves));
  log::debug("rank {}: layout {} on {} ranks; {} bytes sent, {} received ({} tensors checked) in {:.3f} s", me,
             plan.epoch(), to.size(), stats_.bytes_sent, stats_.bytes_received, stats_.tensors_received,
             stats_.seconds);
  return tokens_.get();
}

// Invariant 11: what a change prepared goes; the layout is the one before it.
void dp_member::discard_change() {
  next_tokens_.reset();
  next_borrowed_.reset();
  incoming_.clear();
  error_ = nullptr;
  const bool joining = change_ && index_of(change_->from_members(), pool_.rank()) < 0;
  change_.reset();
  std::unique_ptr<runtime::communicator> old_moves = std::move(moves_);
  if (joining) {  // nothing served with these yet
    dec_.reset();
    w_ = parallel::model_weights();
  }
  if (on_layout) on_layout();  // the moves communicator is no longer registered, before it goes
  release_later({}, std::move(old_moves));
}

void dp_member::abandon() {
  if (!change_ && !moving_.joinable()) return;
  if (moves_) moves_->abort("the change was abandoned: a rank of it was lost");  // its moves end now
  if (moving_.joinable()) moving_.join();
  log::warn("rank {}: the change to layout {} was abandoned; the group is as before it", pool_.rank(),
            change_ ? change_->epoch() : 0);
  discard_change();
}

void dp_member::to_standby() {
  abandon();
  if (members_.empty()) return;
  leave_group({}, {});
  log::info("rank {}: standby again (the change that took it in was abandoned)", pool_.rank());
}

// This rank serves no more: the group's new members and placement (without it) are set and the
// layout's communicators unregistered (on_layout) before they go, with its weights.
void dp_member::leave_group(std::vector<int> members, std::vector<int> placement) {
  std::unique_ptr<runtime::communicator> old_tokens = std::move(tokens_), old_borrowed = std::move(borrowed_);
  members_ = std::move(members);
  placement_ = std::move(placement);
  if (on_layout) on_layout();
  dec_.reset();
  if (moe_) retired_.push_back(std::move(moe_));
  old_tokens.reset();
  old_borrowed.reset();
  w_ = parallel::model_weights();
}

// A recovery (invariant 8): the survivors' communicators, the lost ranks' experts from the checkpoint.
runtime::communicator* dp_member::recover(const serve::DpScale& plan) {
  const int me = pool_.rank();
  check_plan(plan);
  abandon();  // invariant 11: a change under way is given up first
  const std::vector<int> to(plan.to_members().begin(), plan.to_members().end());
  TROUPE_CHECK(index_of(to, me) >= 0, errc::internal, "pool rank {} recovers a group it is not in", me);
  for (int r : plan.lost()) mark_lost(r);
  const auto t0 = std::chrono::steady_clock::now();
  stats_ = {};
  make_comms(xfer_, to, plan.epoch());
  if (config_.is_moe()) {
    const auto& F = plan.from_members();
    std::vector<std::pair<int64_t, int64_t>> wanted;  // (layer, expert)
    for (size_t l = 0; l < w_.layers.size(); ++l) {
      if (!w_.layers[l].is_moe) continue;
      for (int e = 0; e < plan.placement_size(); ++e)
        if (to[static_cast<size_t>(plan.placement(e))] == me && index_of(plan.lost(), F[plan.from_placement(e)]) >= 0)
          wanted.emplace_back(static_cast<int64_t>(l), e);
    }
    log::debug("rank {}: recovery placement {} from {}; wants {} experts", me, fmt::join(plan.placement(), ","),
               fmt::join(plan.from_placement(), ","), wanted.size());
    if (!wanted.empty()) reload_experts(wanted);
  }
  install(to, std::vector<int>(plan.placement().begin(), plan.placement().end()), plan.epoch());
  stats_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log::info("rank {}: the group goes on with {} ranks (layout {}) after losing pool rank(s) {}; {} expert tensors "
            "({} bytes) read again from {} in {:.3f} s",
            me, to.size(), plan.epoch(), fmt::join(plan.lost(), ", "), stats_.tensors_received,
            stats_.bytes_received, dir_.empty() ? std::string("memory") : dir_, stats_.seconds);
  return tokens_.get();
}

// The experts a lost rank held, read again: from the checkpoint (or the weights a test loaded from).
void dp_member::reload_experts(const std::vector<std::pair<int64_t, int64_t>>& wanted) {
  auto is_wanted = [&](const std::string& name) {
    if (!ep::ep_is_expert_param(name)) return false;
    return std::find(wanted.begin(), wanted.end(), layer_and_expert(name)) != wanted.end();
  };
  parallel::model_weights got = parallel::model_weights::allocate(config_, is_wanted);
  if (source_) {
    auto all = source_->parameters();
    for (auto& p : got.parameters())
      for (auto& [name, t] : all)
        if (name == p.name) p.value = t.clone();
  } else {
    TROUPE_CHECK(!dir_.empty(), errc::internal, "pool rank {}: no checkpoint to read a lost rank's experts from",
                 pool_.rank());
    runtime::safetensors_index idx = runtime::safetensors_index::open_dir(dir_);
    for (auto& p : got.parameters())
      p.value = idx.get_as(p.name, runtime::dtype::f32, p.value.shape()).clone();
  }
  for (const auto& [l, e] : wanted) {
    auto from = ep::ep_expert_sets(got.layers[static_cast<size_t>(l)], config_);
    auto into = ep::ep_expert_sets(w_.layers[static_cast<size_t>(l)], config_);
    for (size_t k = 0; k < into.size(); ++k) {
      tensor& t = (*from[k].tensors)[static_cast<size_t>(e)];
      TROUPE_CHECK(t.defined(), errc::internal, "layer {} expert {} was not read", l, e);
      stats_.bytes_received += t.nbytes();
      ++stats_.tensors_received;
      (*into[k].tensors)[static_cast<size_t>(e)] =
          memory_ == dp_weight_memory::shared ? runtime::shared_weights_copy(t) : std::move(t);
    }
  }
}

runtime::communicator* dp_member::regroup(const serve::DpScale& plan) {
  prepare(plan);
  return commit(plan);
}

void dp_member::announce(const serve::DpScale& plan) {
  const std::string body = plan.SerializeAsString();
  for (int j : plan.to_members()) {
    if (index_of(plan.from_members(), j) >= 0) continue;
    pool_.send(tensor::from_vector(std::vector<int64_t>{plan_join, static_cast<int64_t>(body.size())}, {2}), j,
               tag_plan);
    tensor b = tensor::empty({static_cast<int64_t>(body.size())}, runtime::dtype::u8);
    std::memcpy(b.data_ptr(), body.data(), body.size());
    pool_.send(b, j, tag_plan);
  }
}

void dp_member::end_standby() {
  const std::vector<int> gone = lost();
  for (int j : pool_members())
    if (j != pool_.rank() && index_of(members_, j) < 0 && index_of(gone, j) < 0)
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
  el.pool_ranks = static_cast<int>(pool_members().size());
  el.plan = [this](int target) { return plan(target); };
  el.plan_recovery = [this](const std::vector<int>& l) { return plan_recovery(l); };
  el.recover = [this](const serve::DpScale& p) { return recover(p); };
  el.lost = [this] { return lost(); };
  el.members = [this] { return members_; };
  el.pool_alive = [this] { return pool_alive(); };
  el.control = &xfer_;  // bounded waits; the moves' thread is idle whenever a recovery runs
  el.moving = [this] { return moving_.joinable() && !done_.load(); };
  el.watched = [this] { return watched(); };
  el.abandon = [this] { abandon(); };
  el.to_standby = [this] { to_standby(); };
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
    std::unique_ptr<local_executor> exec;
    runtime::communicator* c = nullptr;
    try {
      el.prepare(*plan);  // nothing to serve meanwhile: its KV cache is made while the weights move
      exec = std::make_unique<local_executor>(m.decoder(), plan->num_blocks(), opts.block_size);
      c = el.commit(*plan);
    } catch (const std::exception& e) {  // invariant 11: a rank of the change was lost; rank 0 gives it up
      exec.reset();
      const std::vector<int> lost = m.lost();
      if (std::find(lost.begin(), lost.end(), m.pool_rank()) != lost.end()) throw;  // this rank is the lost one
      if (!dp_saw_loss(el)) throw;
      log::warn("rank {}: the change that was taking it in failed ({}); a rank of it was lost", m.pool_rank(),
                e.what());
      m.abandon();
      dp_await_abandoned(el);
      continue;
    }
    TROUPE_CHECK(c != nullptr, errc::internal, "a standby rank taken into a group of {} ranks got no communicator",
                 plan->to_ranks());
    ++out.joins;
    log::info("pool rank {}: joined the serving group as rank {} (layout {}, {} ranks); {} bytes of weights "
              "received, {} mapped from a rank of this host, {} tensors checked, in {:.3f} s",
              m.pool_rank(), c->rank(), plan->epoch(), plan->to_ranks(), m.last_transfer().bytes_received,
              m.last_transfer().bytes_mapped, m.last_transfer().tensors_received, m.last_transfer().seconds);
    engine eng(*exec, tok, opts);
    const auto res = dp_follow(eng, *c, {}, el);
    out.steps += res.steps;
    standby = res.left;
  }
  return out;
}

}  // namespace troupe::elastic
