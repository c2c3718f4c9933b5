// parallel/train/trainer.cpp — one rank's training step, evaluation, state and checkpoints.
#include "parallel/train/trainer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "parallel/cxl/tiered_state.h"
#include "parallel/ep/ep_shard.h"
#include "parallel/data/byte_tokenizer.h"
#include "parallel/data/token_file.h"
#include "parallel/train/checkpoint.h"
#include "runtime/error.h"
#include "runtime/job_spec.h"
#include "runtime/log.h"

namespace troupe::parallel {

using runtime::errc;
using runtime::tensor;
namespace fs = std::filesystem;

// ------------------------------------------------------------------ data sources

dataset_source::dataset_source(packed_dataset ds, data_split split, batch_layout layout, uint64_t seed, bool shuffle)
    : ds_(ds), split_(split), layout_(layout), seed_(seed), shuffle_(shuffle), it_(ds, split, layout, seed, shuffle) {}

void dataset_source::next(int32_t* inputs, int32_t* targets) { it_.next(inputs, targets); }

nlohmann::json dataset_source::position() const {
  const data_position p = it_.position();
  return {{"epoch", p.epoch}, {"index", p.index}};
}

void dataset_source::restore(const nlohmann::json& position) {
  TROUPE_CHECK(position.is_object() && position.contains("epoch") && position.contains("index") &&
                   position["epoch"].is_number_integer() && position["index"].is_number_integer(),
               errc::format, "data position must be {{\"epoch\": int, \"index\": int}}, got {}", position.dump());
  data_position p{position["epoch"].get<int64_t>(), position["index"].get<int64_t>()};
  TROUPE_CHECK(p.epoch >= 0 && p.index >= 0 && p.index < it_.sequences_per_epoch(), errc::format,
               "data position (epoch {}, index {}) is outside the {} sequences of an epoch (another dataset or "
               "seq_len?)",
               p.epoch, p.index, it_.sequences_per_epoch());
  it_ = batch_iterator(ds_, split_, layout_, seed_, shuffle_, p);
}

// ------------------------------------------------------------------ trainer

namespace {

void copy_values(model_weights& dst, const model_weights& src) {
  auto d = dst.parameters();
  const auto s = src.parameters();
  for (size_t i = 0; i < s.size(); ++i) std::memcpy(d[i].value.data_ptr(), s[i].second.data_ptr(), s[i].second.nbytes());
}

}  // namespace

trainer::trainer(job::JobSpec spec, train_comms comms, model_weights weights, std::unique_ptr<batch_source> train,
                 std::unique_ptr<batch_source> val)
    : spec_(std::move(spec)),
      comms_(comms),
      weights_(std::move(weights)),
      grads_(model_weights::zeros_like(weights_)),
      train_(std::move(train)),
      val_(std::move(val)),
      sched_{spec_.optimizer().lr(), spec_.optimizer().min_lr(), spec_.optimizer().warmup_steps(),
             spec_.train().max_steps()},
      opt_(weights_, adamw_config{spec_.optimizer().betas_size() > 0 ? spec_.optimizer().betas(0) : 0.9,
                                  spec_.optimizer().betas_size() > 1 ? spec_.optimizer().betas(1) : 0.999,
                                  spec_.optimizer().eps(), spec_.optimizer().weight_decay()}),
      dec_(weights_) {
  const int64_t dp = spec_.parallel().dp(), cp = spec_.parallel().cp();
  TROUPE_CHECK(comms_.world_size == dp * cp && comms_.rank >= 0 && comms_.rank < comms_.world_size,
               errc::invalid_argument, "trainer: rank {} of {} ranks, but parallel.dp {} x parallel.cp {} = {}",
               comms_.rank, comms_.world_size, dp, cp, dp * cp);
  TROUPE_CHECK(comms_.world_size == 1 || (comms_.grads && comms_.grads->size() == comms_.world_size),
               errc::invalid_argument, "trainer: {} ranks need a gradient communicator over all of them",
               comms_.world_size);
  TROUPE_CHECK(train_ != nullptr, errc::invalid_argument, "trainer: no training data source");
  TROUPE_CHECK(spec_.batch().seq_len() % cp == 0, errc::invalid_argument,
               "trainer: batch.seq_len {} is not divisible by parallel.cp {}", spec_.batch().seq_len(), cp);
  if (cp > 1) {
    TROUPE_CHECK(comms_.cp && comms_.cp->size() == cp && comms_.cp->rank() == cp_rank(), errc::invalid_argument,
                 "trainer: parallel.cp {} needs a context-parallel communicator of {} ranks in which this rank is {}",
                 cp, cp, cp_rank());
    cp_.comm = comms_.cp;
    cp_.mode = spec_.parallel().cp_mode() == job::Parallel::RING ? cp_mode::ring : cp_mode::ulysses;
    dec_.set_context_parallel(&cp_);
  }
  // parallel.ep > 1: the MoE layers run across every rank (parallel/ep/ep_runner.h) and each rank
  // holds the non-expert parameters and its native experts only (weights, gradients, AdamW moments:
  // parallel/ep/ep_shard.h). An expert's gradient is the whole batch's on its owner, so grad_sync
  // reduces only the other parameters.
  if (const int64_t ep = spec_.parallel().ep(); ep > 1) {
    const model_config& mc = weights_.config();
    bool moe = false;
    for (const auto& L : weights_.layers) moe |= L.is_moe;
    TROUPE_CHECK(moe, errc::invalid_argument, "parallel.ep = {}: the model ({}) has no MoE layer to split", ep,
                 runtime::model_family_name(mc.family));
    TROUPE_CHECK(mc.n_experts % ep == 0, errc::invalid_argument,
                 "parallel.ep = {} must divide the model's {} experts (each rank owns n_experts / ep)", ep,
                 mc.n_experts);
    TROUPE_CHECK(comms_.ep && comms_.ep->size() == ep && comms_.ep->rank() == comms_.rank, errc::invalid_argument,
                 "trainer: parallel.ep {} needs an expert-parallel communicator over all {} ranks", ep, ep);
    TROUPE_CHECK(spec_.memory().device_budget().empty(), errc::invalid_argument,
                 "memory.device_budget does not run with parallel.ep > 1 yet (the arena plan is recorded without "
                 "expert parallelism); remove one of them");
    ep::ep_context ctx;
    ctx.tokens = comms_.ep;
    ctx.weights = comms_.ep_weights;
    ctx.placement = ep::ep_placement::contiguous(mc.n_experts, static_cast<int>(ep));
    ctx.options = ep::ep_options_from_spec(spec_);
    ep::ep_shard_weights(weights_, ctx.placement, comms_.rank);
    grads_ = model_weights::zeros_like(weights_);
    opt_ = adamw(weights_, opt_.config());
    ep_ = std::make_unique<ep::ep_moe_runner>(std::move(ctx));
    dec_.set_expert_parallel(ep_.get());
  }
  // memory.device_budget / memory.memo (parallel/memo/memory_plan.h): plan before the first step and
  // refuse to start when the plan does not fit. Every cp rank records its steps together (cp buffers).
  const memo::memory_settings ms = memo::memory_settings_of(spec_);
  if (ms.device_budget > 0 || ms.memo) {
    const int64_t B = spec_.batch().micro_batch(), Tl = spec_.batch().seq_len() / cp;
    memory_ = std::make_unique<memo::memory_report>(memo::plan_memory(weights_, B, Tl, ms, true, &dec_));
    TROUPE_CHECK(memory_->fits, errc::invalid_argument, "rank {}: {}", comms_.rank,
                 memo::memory_does_not_fit(*memory_, weights_, cp,
                                           std::max<int64_t>(weights_.config().max_position_embeddings / cp, 16)));
  }
  memo::memo_options mo{memory_ ? memory_->alpha : 1.0, ms.keep_last_layers, ms.copy_bandwidth_gbps};
  // Host placement through the tiers (invariant 6), before grad_sync keeps handles to the gradients.
  if (const std::string policy = runtime::job_host_placement(spec_); !policy.empty()) {
    std::vector<runtime::memory_tier> tiers = runtime::tiers_from_spec(spec_);
    tiered_ = std::make_unique<cxl::tiered_group_memory>(
        cxl::place_job(spec_, weights_, memory_ ? memory_->host_bytes : 0, tiers), std::move(tiers));
    tiered_->rehome("momentum", opt_.exp_avg());
    tiered_->rehome("variance", opt_.exp_avg_sq());
    tiered_->rehome("master_grads", grads_);
    tiered_->rehome("master_weights", weights_);
    if (comms_.rank == 0) runtime::log::info("{}", cxl::describe(tiered_->plan()));
    const cxl::group_placement& act = tiered_->plan()["activations"];
    mo.host_placement = act.where;
    mo.host_access = cxl::group_access(act, tiered_->tiers());
  }
  sync_ = std::make_unique<grad_sync>(grads_, comms_.world_size > 1 ? comms_.grads : nullptr, size_t{4} << 20,
                                      ep_ ? std::function<bool(const std::string&)>(ep::ep_is_expert_param)
                                          : std::function<bool(const std::string&)>());
  if (ms.memo) swap_ = std::make_unique<memo::memo_swap>(mo);
  if (ms.device_budget > 0) arena_ = std::make_unique<memo::step_arena>(memory_->plan);
}

const cxl::placement_plan* trainer::placement() const { return tiered_ ? &tiered_->plan() : nullptr; }

trainer::~trainer() = default;

void trainer::slice_for_cp(const std::vector<int32_t>& full, std::vector<int32_t>& mine) const {
  const int64_t B = spec_.batch().micro_batch(), T = spec_.batch().seq_len(), cp = cp_size();
  const int64_t Tl = T / cp, off = cp_rank() * Tl;
  mine.resize(static_cast<size_t>(B * Tl));
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(mine.data() + b * Tl, full.data() + b * T + off, static_cast<size_t>(Tl) * sizeof(int32_t));
}

step_stats trainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t B = spec_.batch().micro_batch(), T = spec_.batch().seq_len(), cp = cp_size();
  const int64_t Tl = T / cp, accum = spec_.batch().grad_accum();
  const int64_t global_tokens = spec_.batch().global_batch() * T;
  std::vector<int32_t> in_full(static_cast<size_t>(B * T)), tgt_full(in_full.size()), in, tgt;
  grads_.zero_();
  sync_->begin();
  double loss = 0;
  for (int64_t a = 0; a < accum; ++a) {
    train_->next(in_full.data(), tgt_full.data());
    slice_for_cp(in_full, in);
    slice_for_cp(tgt_full, tgt);
    fb_options o;
    o.loss_denominator = static_cast<double>(global_tokens);
    if (a == accum - 1 && sync_->active()) o.grads_ready = [this](int64_t g) { sync_->group_ready(g); };
    o.memo = swap_.get();
    o.arena = arena_.get();
    loss += dec_.forward_backward(in.data(), tgt.data(), B, Tl, grads_, o);
  }
  sync_->finish();
  tensor l = tensor::empty({1});
  l.data<float>()[0] = static_cast<float>(loss);
  sync_->all_reduce(l, runtime::reduce_op::sum);
  step_stats s;
  if (ep_) {
    // Replicated parameters' squares here, plus every rank's experts' (exact: each rank's double
    // in its own slot of an i64 sum), added in rank order.
    const double shared = grad_sum_squares(grads_, [](const std::string& n) { return !ep::ep_is_expert_param(n); });
    const double mine = grad_sum_squares(grads_, ep::ep_is_expert_param);
    tensor parts = tensor::zeros({comms_.world_size}, runtime::dtype::i64);
    std::memcpy(parts.data<int64_t>() + comms_.rank, &mine, sizeof(double));
    sync_->all_reduce(parts, runtime::reduce_op::sum);
    double sq = shared;
    for (int r = 0; r < comms_.world_size; ++r) {
      double d;
      std::memcpy(&d, parts.data<int64_t>() + r, sizeof(double));
      sq += d;
    }
    s.grad_norm = std::sqrt(sq);
    clip_grads_to(grads_, s.grad_norm, spec_.optimizer().grad_clip());
  } else {
    s.grad_norm = clip_grad_norm(grads_, spec_.optimizer().grad_clip());
  }
  s.lr = sched_.at(opt_.steps());
  opt_.step(weights_, grads_, s.lr);
  if (ep_) ep_->weights_changed();  // EPLB's resident replicas are stale now
  tokens_seen_ += global_tokens;
  s.step = opt_.steps();
  s.loss = l.data<float>()[0];
  s.tokens = global_tokens;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  s.exposed_comm_s = sync_->exposed_wait_s();
  return s;
}

double trainer::evaluate() {
  TROUPE_CHECK(val_ != nullptr, errc::invalid_argument,
               "evaluate: no validation data (data.val_fraction is 0)");
  const int64_t B = spec_.batch().micro_batch(), T = spec_.batch().seq_len(), cp = cp_size();
  const int64_t Tl = T / cp, n = std::max<int64_t>(1, spec_.train().eval_batches());
  const double denom = static_cast<double>(n * B * spec_.parallel().dp() * T);
  val_->restore({{"epoch", 0}, {"index", 0}});
  std::vector<int32_t> in_full(static_cast<size_t>(B * T)), tgt_full(in_full.size()), in, tgt;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    val_->next(in_full.data(), tgt_full.data());
    slice_for_cp(in_full, in);
    slice_for_cp(tgt_full, tgt);
    // forward_loss: the mean over this call's B * Tl (all valid) targets.
    fb_options o;
    o.keep_activations = false;  // one layer's activations at a time: validation stays small
    sum += static_cast<double>(dec_.forward_loss(in.data(), tgt.data(), B, Tl, o)) * static_cast<double>(B * Tl);
  }
  if (ep_) ep_->release();  // forward only: the MoE layers' activations are not needed
  tensor l = tensor::empty({1});
  l.data<float>()[0] = static_cast<float>(sum / denom);
  sync_->all_reduce(l, runtime::reduce_op::sum);
  return l.data<float>()[0];
}

size_t trainer::activation_bytes() const {
  size_t n = 0;
  for (const auto& a : dec_.saved()) n += a.bytes();
  return n;
}

nlohmann::json trainer::state() const {
  nlohmann::json s;
  s["step"] = opt_.steps();
  s["tokens_seen"] = tokens_seen_;
  s["train_position"] = train_->position();
  // The only randomness of a step is the data order: a pure function of (data.seed, epoch),
  // so the data position is the whole RNG state. The init seed is recorded for provenance.
  s["rng"] = {{"data_shuffle", "mt19937_64 Fisher-Yates per epoch"},
              {"data_seed", spec_.data().seed()},
              {"init_seed", spec_.seed()}};
  s["parallel"] = {{"dp", spec_.parallel().dp()}, {"cp", spec_.parallel().cp()}, {"ep", spec_.parallel().ep()}};
  s["spec"] = runtime::describe(spec_);
  return s;
}

void trainer::resume(const std::string& path) {
  checkpoint_contents c = load_checkpoint(path);
  if (ep_) {  // the checkpoint holds every expert: keep this rank's
    for (model_weights* w : {&c.weights, &c.exp_avg, &c.exp_avg_sq})
      ep::ep_shard_weights(*w, ep_->placement(), comms_.rank);
  }
  const auto want = weights_.parameters();
  const auto got = static_cast<const model_weights&>(c.weights).parameters();
  TROUPE_CHECK(got.size() == want.size(), errc::format, "resume from {}: {} tensors, the job's model has {}", c.dir,
               got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    TROUPE_CHECK(got[i].first == want[i].name && got[i].second.shape() == want[i].value.shape(), errc::format,
                 "resume from {}: tensor {} {} does not match the job's model ({} {})", c.dir, got[i].first,
                 got[i].second.describe(), want[i].name, want[i].value.describe());
  TROUPE_CHECK(c.state.contains("train_position"), errc::format, "resume from {}: trainer_state.json has no "
               "train_position", c.dir);
  // Copy in place: the decoder and grad_sync keep handles to these tensors.
  auto dst = weights_.parameters();
  for (size_t i = 0; i < got.size(); ++i)
    std::memcpy(dst[i].value.data<float>(), got[i].second.data<float>(),
                static_cast<size_t>(got[i].second.numel()) * sizeof(float));
  if (tiered_) {
    // The moments live in their groups' tier memory: restore (which checks them), then copy the
    // values back into that memory and keep its handles.
    model_weights m = opt_.exp_avg(), v = opt_.exp_avg_sq();
    opt_.restore(std::move(c.exp_avg), std::move(c.exp_avg_sq), c.step);
    copy_values(m, opt_.exp_avg());
    copy_values(v, opt_.exp_avg_sq());
    opt_.exp_avg() = std::move(m);
    opt_.exp_avg_sq() = std::move(v);
  } else {
    opt_.restore(std::move(c.exp_avg), std::move(c.exp_avg_sq), c.step);
  }
  train_->restore(c.state["train_position"]);
  tokens_seen_ = c.state.value("tokens_seen", int64_t{0});
}

std::vector<ep::ep_expert_tensors> trainer::expert_sets(int64_t layer) {
  TROUPE_CHECK(ep_ && layer >= 0 && layer < static_cast<int64_t>(weights_.layers.size()) &&
                   weights_.layers[static_cast<size_t>(layer)].is_moe,
               errc::invalid_argument, "expert_sets: layer {} is not an expert-parallel MoE layer", layer);
  std::vector<ep::ep_expert_tensors> sets;
  for (model_weights* w : {&weights_, &grads_, &opt_.exp_avg(), &opt_.exp_avg_sq()})
    for (auto& s : ep::ep_expert_sets(w->layers[static_cast<size_t>(layer)], weights_.config())) sets.push_back(s);
  return sets;
}

size_t trainer::migrate_experts(int64_t layer, const ep::ep_placement& to) {
  const size_t sent = ep::ep_migrate(expert_sets(layer), ep_->placement(layer), to, *comms_.ep);
  set_expert_placement(layer, to);
  return sent;
}

void trainer::set_expert_placement(int64_t layer, const ep::ep_placement& p) {
  TROUPE_CHECK(ep_, errc::invalid_argument, "set_expert_placement: parallel.ep is 1");
  ep_->set_placement(layer, p);
}

model_weights trainer::gathered_weights() {
  if (!ep_) return model_weights(weights_);
  return ep::ep_gather_weights(weights_, [this](tensor& t) { sync_->all_reduce(t, runtime::reduce_op::sum); });
}

std::string trainer::save_checkpoint() {
  if (ep_) {  // every rank contributes its experts (weights and moments); rank 0 writes them all
    auto sum = [this](tensor& t) { sync_->all_reduce(t, runtime::reduce_op::sum); };
    model_weights w = ep::ep_gather_weights(weights_, sum);
    model_weights m = ep::ep_gather_weights(opt_.exp_avg(), sum);
    model_weights v = ep::ep_gather_weights(opt_.exp_avg_sq(), sum);
    if (comms_.rank != 0) return "";
    return parallel::save_checkpoint(spec_.checkpoint().dir(), opt_.steps(), w, m, v, state(),
                                     spec_.checkpoint().keep());
  }
  if (comms_.rank != 0) return "";
  return parallel::save_checkpoint(spec_.checkpoint().dir(), opt_.steps(), weights_, opt_.exp_avg(),
                                   opt_.exp_avg_sq(), state(), spec_.checkpoint().keep());
}

// ------------------------------------------------------------------ from the spec

namespace {

runtime::rope_type rope_type_of(job::RopeScaling::Type t) {
  switch (t) {
    case job::RopeScaling::LINEAR: return runtime::rope_type::linear;
    case job::RopeScaling::YARN: return runtime::rope_type::yarn;
    case job::RopeScaling::LLAMA3: return runtime::rope_type::llama3;
    default: return runtime::rope_type::standard;
  }
}

void apply_rope_scaling(model_weights& w, const job::RopeScaling& r) {
  if (r.type() == job::RopeScaling::NONE) return;
  const int64_t current = w.config().max_position_embeddings;
  const int64_t original = r.original_max_position() > 0 ? r.original_max_position() : current;
  runtime::rope_config rc = w.config().rope;
  rc.type = rope_type_of(r.type());
  rc.factor = r.factor();
  rc.original_max_position_embeddings = original;
  rc.beta_fast = r.beta_fast();
  rc.beta_slow = r.beta_slow();
  rc.low_freq_factor = r.low_freq_factor();
  rc.high_freq_factor = r.high_freq_factor();
  rc.attention_factor = 0.0;  // yarn: derived from the factor
  const auto extended = static_cast<int64_t>(std::llround(static_cast<double>(original) * r.factor()));
  w.set_rope(rc, std::max(current, extended));
}

bool is_llmc(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  int32_t magic = 0;
  const bool ok = ::read(fd, &magic, sizeof(magic)) == static_cast<ssize_t>(sizeof(magic));
  ::close(fd);
  return ok && magic == llmc_magic;
}

}  // namespace

model_weights make_model(const job::JobSpec& spec) {
  model_weights w;
  if (spec.model().has_create()) {
    const auto& m = spec.model().create();
    runtime::model_config c;
    c.family = runtime::model_family::llama;
    c.model_type = "llama";
    c.vocab_size = m.vocab();
    c.hidden = m.hidden();
    c.intermediate = m.intermediate();
    c.n_layers = m.layers();
    c.n_heads = m.heads();
    c.n_kv_heads = m.kv_heads();
    c.head_dim = m.hidden() / m.heads();
    c.max_position_embeddings = m.max_position();
    c.rms_norm_eps = m.rms_norm_eps();
    c.tie_word_embeddings = m.tie_embeddings();
    c.rope.head_dim = c.head_dim;
    c.rope.theta = m.rope_theta();
    c.rope.max_position_embeddings = c.max_position_embeddings;
    if (m.experts() > 0) {  // Mixtral layout
      c.family = runtime::model_family::mixtral;
      c.model_type = "mixtral";
      c.n_experts = m.experts();
      c.top_k = m.experts_per_token() > 0 ? m.experts_per_token() : 2;
      c.moe_intermediate = m.expert_intermediate() > 0 ? m.expert_intermediate() : m.intermediate();
      c.intermediate = c.moe_intermediate;
      c.norm_topk_prob = true;
    }
    w = model_weights::random_init(c, spec.seed());
  } else {
    std::string dir = spec.model().path();
    TROUPE_CHECK(!dir.empty(), errc::invalid_argument, "model: give model.path or model.create");
    // A checkpoint root (holding `latest`) stands for its newest checkpoint.
    if (!fs::exists(fs::path(dir) / "config.json") && fs::exists(fs::path(dir) / "latest")) {
      const std::string latest = latest_checkpoint(dir);
      TROUPE_CHECK(!latest.empty(), errc::not_found, "model.path {}: no complete checkpoint in it", dir);
      dir = latest;
    }
    w = model_weights::load(dir);
  }
  apply_rope_scaling(w, spec.model().rope_scaling());
  return w;
}

packed_dataset make_dataset(const job::JobSpec& spec, int64_t vocab_size) {
  const auto& d = spec.data();
  token_span tokens;
  switch (d.format()) {
    case job::Data::TEXT: {
      TROUPE_CHECK(vocab_size >= 256, errc::invalid_argument,
                   "data.format text (byte-level tokens 0..255) needs a vocabulary of at least 256, the model has {}",
                   vocab_size);
      tokens = token_span::from_vector(byte_encode(read_text_file(d.train())));
      break;
    }
    case job::Data::TOKENS_U16:
    case job::Data::TOKENS_U32: {
      const bool u16 = d.format() == job::Data::TOKENS_U16;
      const token_format f = is_llmc(d.train()) ? (u16 ? token_format::llmc_u16 : token_format::llmc_u32)
                                                : (u16 ? token_format::raw_u16 : token_format::raw_u32);
      tokens = token_file::open(d.train(), f, vocab_size).tokens();
      break;
    }
    default:
      TROUPE_THROW(errc::invalid_argument, "data.format {} is not supported", static_cast<int>(d.format()));
  }
  packed_config pc;
  pc.seq_len = spec.batch().seq_len();
  pc.val_fraction = d.val_fraction();
  return packed_dataset(tokens, pc);
}

std::unique_ptr<trainer> make_trainer(const job::JobSpec& spec, train_comms comms, const std::string& resume) {
  model_weights w = make_model(spec);
  TROUPE_CHECK(spec.batch().seq_len() <= w.config().max_position_embeddings, errc::invalid_argument,
               "batch.seq_len {} exceeds the model's context {} (max_position_embeddings); extend it with "
               "model.rope_scaling",
               spec.batch().seq_len(), w.config().max_position_embeddings);
  packed_dataset ds = make_dataset(spec, w.config().vocab_size);
  const int64_t cp = spec.parallel().cp();
  batch_layout layout{spec.batch().micro_batch(), static_cast<int>(spec.parallel().dp()),
                      static_cast<int>(comms.rank / cp)};
  auto train = std::make_unique<dataset_source>(ds, data_split::train, layout, spec.data().seed(), true);
  std::unique_ptr<batch_source> val;
  if (ds.num_sequences(data_split::val) > 0)
    val = std::make_unique<dataset_source>(ds, data_split::val, layout, spec.data().seed(), false);
  auto t = std::make_unique<trainer>(spec, comms, std::move(w), std::move(train), std::move(val));
  if (!resume.empty()) t->resume(resume);
  return t;
}

double train_flops_per_token(const runtime::model_config& c, int64_t params, int64_t seq_len) {
  // The embedding lookup is no matmul; a tied LM head still is one.
  const double matmul_params = static_cast<double>(params - c.vocab_size * c.hidden) +
                               (c.tie_word_embeddings ? static_cast<double>(c.vocab_size * c.hidden) : 0.0);
  return 6.0 * matmul_params +
         12.0 * static_cast<double>(c.n_layers * c.n_heads * c.head_dim) * static_cast<double>(seq_len);
}

}  // namespace troupe::parallel
