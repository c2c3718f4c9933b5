// runtime/job_spec.cpp — YAML -> job::JobSpec by protobuf reflection (so every field gets
// unknown-key and type checks), then defaults, derived fields and semantic checks.
#include "runtime/job_spec.h"

#include <fmt/format.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <vector>

#include "runtime/error.h"

#ifdef TROUPE_HAVE_YAML_CPP
#include <yaml-cpp/yaml.h>
#endif

namespace troupe::runtime {
namespace {

namespace pb = google::protobuf;

// ---------------------------------------------------------------- defaults (one place)

[[maybe_unused]] void apply_create_preset(job::CreateModel& c, job::CreateModel::Preset preset) {
  switch (preset) {
    case job::CreateModel::SMALL:
      c.set_hidden(256), c.set_layers(4), c.set_heads(8), c.set_kv_heads(4);
      c.set_intermediate(704), c.set_max_position(1024);
      break;
    default:  // TINY
      c.set_hidden(64), c.set_layers(2), c.set_heads(4), c.set_kv_heads(2);
      c.set_intermediate(192), c.set_max_position(256);
      break;
  }
  c.set_preset(preset);
  c.set_vocab(258);  // the byte tokenizer's 256 bytes + BOS + EOS (parallel/data/byte_tokenizer.h)
  c.set_rope_theta(10000.0);
  c.set_rms_norm_eps(1e-5);
  c.set_tie_embeddings(false);
}

// ---------------------------------------------------------------- helpers
// ([[maybe_unused]]: only the YAML mapper uses them, and a build without yaml-cpp has none.)

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// "; did you mean `warmup_steps`?" or "": the closest known word by edit distance, or
// one that contains the word (`warmup` -> `warmup_steps`).
[[maybe_unused]] std::string did_you_mean(const std::string& word, const std::vector<std::string>& known) {
  const std::string w = lower(word);
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const auto& k : known) {
    const size_t d = edit_distance(w, k);
    const bool near = d <= std::max<size_t>(2, w.size() / 3);
    const bool contains = w.size() >= 3 && k.size() >= 3 &&
                          (k.find(w) != std::string::npos || w.find(k) != std::string::npos);
    if ((near || contains) && d < best_d) best = k, best_d = d;
  }
  return best.empty() ? std::string() : fmt::format("; did you mean `{}`?", best);
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

[[maybe_unused]] std::vector<std::string> enum_names(const pb::EnumDescriptor* e) {
  std::vector<std::string> out;
  for (int i = 0; i < e->value_count(); ++i) out.push_back(lower(e->value(i)->name()));
  return out;
}

[[maybe_unused]] std::vector<std::string> field_names(const pb::Descriptor* d) {
  std::vector<std::string> out;
  for (int i = 0; i < d->field_count(); ++i) out.push_back(d->field(i)->name());
  return out;
}

// Where each key path was written: "file:line:col", absent for defaults.
struct spec_locations {
  std::string source;
  std::map<std::string, std::string> at;
  std::map<std::string, std::string> overrides;  // key path -> "--set key=value"

  std::string of(const std::string& key) const {
    auto it = at.find(key);
    return it != at.end() ? it->second : fmt::format("{} (default)", source);
  }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    TROUPE_THROW(errc::invalid_argument, "`{}` at {} {}", key, of(key), what);
  }
};

// ---------------------------------------------------------------- semantic checks

int64_t checked_mul(const spec_locations& L, const std::string& key, int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) L.fail(key, fmt::format("overflows: {} * {}", a, b));
  return r;
}

void validate_model(job::JobSpec& s, const spec_locations& L) {
  const auto& m = s.model();
  if (m.source_case() == job::Model::SOURCE_NOT_SET) {
    if (!L.at.count("model")) {
      TROUPE_THROW(errc::invalid_argument, "`model` is missing in {}; add `model: {{path: HF_DIR}}` or "
                   "`model: {{create: {{preset: tiny}}}}`", L.source);
    }
    L.fail("model", "needs one of `path` (a HF directory: config.json + *.safetensors) or "
                    "`create` (a new model, e.g. `create: {preset: tiny}`)");
  }
  if (m.has_path() && m.path().empty()) L.fail("model.path", "is empty; give a HF model directory");
  if (m.has_create()) {
    const auto& c = m.create();
    auto positive = [&](const char* name, double v) {
      if (!(v > 0)) L.fail(fmt::format("model.create.{}", name), fmt::format("must be positive, got {}", v));
    };
    positive("hidden", static_cast<double>(c.hidden()));
    positive("layers", static_cast<double>(c.layers()));
    positive("heads", static_cast<double>(c.heads()));
    positive("kv_heads", static_cast<double>(c.kv_heads()));
    positive("intermediate", static_cast<double>(c.intermediate()));
    positive("vocab", static_cast<double>(c.vocab()));
    positive("max_position", static_cast<double>(c.max_position()));
    positive("rope_theta", c.rope_theta());
    positive("rms_norm_eps", c.rms_norm_eps());
    if (c.hidden() % c.heads() != 0 || (c.hidden() / c.heads()) % 2 != 0) {
      L.fail("model.create.hidden",
             fmt::format("= {} must be a multiple of 2 * heads = {} (head_dim must be even for RoPE); "
                         "change hidden or heads", c.hidden(), 2 * c.heads()));
    }
    if (c.heads() % c.kv_heads() != 0) {
      L.fail("model.create.kv_heads", fmt::format("= {} must divide heads = {}", c.kv_heads(), c.heads()));
    }
    if (c.experts() < 0) L.fail("model.create.experts", fmt::format("must be >= 0 (0 = dense), got {}", c.experts()));
    if (c.experts() > 0 && (c.experts_per_token() < 0 || c.experts_per_token() > c.experts()))
      L.fail("model.create.experts_per_token",
             fmt::format("= {} must be in [1, experts = {}] (0 = 2)", c.experts_per_token(), c.experts()));
    if (c.experts() == 1 && c.experts_per_token() == 0)
      L.fail("model.create.experts_per_token", "must be given (1) with a single expert");
    if (c.expert_intermediate() < 0)
      L.fail("model.create.expert_intermediate", fmt::format("must be >= 0, got {}", c.expert_intermediate()));
    if (s.data().format() == job::Data::TEXT && c.vocab() < 258) {
      L.fail("model.create.vocab",
             fmt::format("= {} is too small for data.format text (byte-level: 256 bytes + BOS + EOS); set vocab >= 258",
                         c.vocab()));
    }
    if (s.data().format() == job::Data::TOKENS_U16 && c.vocab() > 65536) {
      L.fail("model.create.vocab",
             fmt::format("= {} cannot be reached by data.format tokens_u16 (at most 65536); "
                         "use tokens_u32 or a smaller vocab", c.vocab()));
    }
  }
  const auto& r = m.rope_scaling();
  const std::string type = lower(job::RopeScaling::Type_Name(r.type()));
  if (r.type() == job::RopeScaling::NONE) {
    if (r.factor() != 1.0) {
      L.fail("model.rope_scaling.factor",
             fmt::format("= {} has no effect with type none; set model.rope_scaling.type to linear, "
                         "yarn or llama3", r.factor()));
    }
    return;
  }
  if (!(r.factor() >= 1.0)) {
    L.fail("model.rope_scaling.factor",
           fmt::format("must be >= 1 for type {} (new context / trained context), got {}", type, r.factor()));
  }
  if (r.original_max_position() < 0) {
    L.fail("model.rope_scaling.original_max_position",
           fmt::format("must be >= 0 (0 = the model's max_position), got {}", r.original_max_position()));
  }
  if (r.type() == job::RopeScaling::YARN && !(r.beta_fast() > r.beta_slow() && r.beta_slow() > 0)) {
    L.fail("model.rope_scaling.beta_fast",
           fmt::format("= {} and beta_slow = {} must satisfy beta_fast > beta_slow > 0 (default 32 and 1)",
                       r.beta_fast(), r.beta_slow()));
  }
  if (r.type() == job::RopeScaling::LLAMA3 &&
      !(r.high_freq_factor() > r.low_freq_factor() && r.low_freq_factor() > 0)) {
    L.fail("model.rope_scaling.high_freq_factor",
           fmt::format("= {} and low_freq_factor = {} must satisfy high > low > 0 (default 4 and 1)",
                       r.high_freq_factor(), r.low_freq_factor()));
  }
}

void validate_batch_and_parallel(job::JobSpec& s, const spec_locations& L) {
  auto* b = s.mutable_batch();
  const auto& p = s.parallel();
  if (p.dp() < 1) L.fail("parallel.dp", fmt::format("must be >= 1, got {}", p.dp()));
  if (p.cp() < 1) L.fail("parallel.cp", fmt::format("must be >= 1, got {}", p.cp()));
  if (b->seq_len() <= 0) L.fail("batch.seq_len", fmt::format("must be positive, got {}", b->seq_len()));
  if (b->micro_batch() <= 0) L.fail("batch.micro_batch", fmt::format("must be positive, got {}", b->micro_batch()));
  if (b->global_batch() < 0) {
    L.fail("batch.global_batch", fmt::format("must be >= 0 (0 = derived), got {}", b->global_batch()));
  }
  if (b->grad_accum() < 0) L.fail("batch.grad_accum", fmt::format("must be >= 0 (0 = derived), got {}", b->grad_accum()));
  if (p.ep() < 0 || (p.ep() > 1 && p.ep() != p.dp() * p.cp())) {
    L.fail("parallel.ep", fmt::format("= {} must be 1 (off) or dp * cp = {} (every rank of the job forms the one "
                                      "expert-parallel group)", p.ep(), p.dp() * p.cp()));
  }
  {
    const auto& x = p.expert();
    const std::string m = x.mode();
    if (!m.empty() && m != "llep" && m != "ep" && m != "standard" && m != "eplb")
      L.fail("parallel.expert.mode", fmt::format("'{}' is not one of llep, ep, eplb", m));
    if (x.lambda() != 0 && x.lambda() < 1)
      L.fail("parallel.expert.lambda", fmt::format("= {} must be >= 1 (max/mean load; default 1.3)", x.lambda()));
    if (x.alpha() < 0) L.fail("parallel.expert.alpha", fmt::format("= {} must be > 0 (default 1.0)", x.alpha()));
    if (x.min_chunk() < 0) L.fail("parallel.expert.min_chunk", fmt::format("= {} must be >= 0", x.min_chunk()));
    if (x.eplb_redundant_per_rank() < 0)
      L.fail("parallel.expert.eplb_redundant_per_rank", fmt::format("= {} must be >= 0", x.eplb_redundant_per_rank()));
    const auto& rb = x.rebalance();
    if (rb.threshold() != 0 && rb.threshold() < 1)
      L.fail("parallel.expert.rebalance.threshold", fmt::format("= {} must be >= 1 (default 1.25)", rb.threshold()));
    if (rb.decay() < 0 || rb.decay() >= 1)
      L.fail("parallel.expert.rebalance.decay", fmt::format("= {} must be in [0, 1) (default 0.8)", rb.decay()));
    if (rb.patience() < 0 || rb.cooldown() < 0)
      L.fail(rb.patience() < 0 ? "parallel.expert.rebalance.patience" : "parallel.expert.rebalance.cooldown",
             "must be >= 0");
    if (rb.min_improvement() < 0 || rb.min_improvement() >= 1)
      L.fail("parallel.expert.rebalance.min_improvement",
             fmt::format("= {} must be in [0, 1) (default 0.1)", rb.min_improvement()));
    if (p.ep() > 1 && !s.memory().device_budget().empty())
      L.fail("memory.device_budget", "does not run with parallel.ep > 1 yet; remove one of them");
    if (p.ep() > 1 && s.memory().memo().enabled())
      L.fail("memory.memo.enabled", "MEMO swapping does not run with parallel.ep > 1 yet; turn one of them off");
  }
  if (b->seq_len() % p.cp() != 0) {
    L.fail("batch.seq_len", fmt::format("= {} must be divisible by parallel.cp = {}, which splits each sequence",
                                        b->seq_len(), p.cp()));
  }
  // global = micro * accum * dp
  const int64_t per_step = checked_mul(L, "batch.micro_batch", b->micro_batch(), p.dp());
  if (b->global_batch() == 0) {
    if (b->grad_accum() == 0) b->set_grad_accum(1);
    b->set_global_batch(checked_mul(L, "batch.grad_accum", per_step, b->grad_accum()));
  } else if (b->grad_accum() == 0) {
    if (b->global_batch() % per_step != 0) {
      L.fail("batch.global_batch",
             fmt::format("= {} is not divisible by batch.micro_batch * parallel.dp = {} * {} = {}; "
                         "make it a multiple of {}", b->global_batch(), b->micro_batch(), p.dp(), per_step,
                         per_step));
    }
    b->set_grad_accum(b->global_batch() / per_step);
  } else if (checked_mul(L, "batch.grad_accum", per_step, b->grad_accum()) != b->global_batch()) {
    L.fail("batch.global_batch",
           fmt::format("= {} differs from batch.micro_batch * batch.grad_accum * parallel.dp = {} * {} * {} = {}; "
                       "give only one of global_batch and grad_accum", b->global_batch(), b->micro_batch(),
                       b->grad_accum(), p.dp(), per_step * b->grad_accum()));
  }
  if (s.model().has_create()) {
    const auto& c = s.model().create();
    const auto& r = s.model().rope_scaling();
    int64_t limit = c.max_position();
    if (r.type() != job::RopeScaling::NONE) {
      const int64_t orig = r.original_max_position() > 0 ? r.original_max_position() : c.max_position();
      limit = std::max(limit, static_cast<int64_t>(static_cast<double>(orig) * r.factor()));
    }
    if (b->seq_len() > limit) {
      L.fail("batch.seq_len", fmt::format("= {} exceeds the model's context {} (model.create.max_position{}); "
                                          "raise max_position or use model.rope_scaling", b->seq_len(), limit,
                                          r.type() != job::RopeScaling::NONE ? " with rope_scaling" : ""));
    }
    if (p.cp_mode() == job::Parallel::ULYSSES && (c.heads() % p.cp() != 0 || c.kv_heads() % p.cp() != 0)) {
      L.fail("parallel.cp", fmt::format("= {} must divide model.create.heads = {} and kv_heads = {} with "
                                        "cp_mode ulysses (it splits heads); use cp_mode ring",
                                        p.cp(), c.heads(), c.kv_heads()));
    }
  }
}

// memory.tiers: the checks that need no machine (tiers_from_spec checks the nodes exist).
void validate_tiers(const job::Memory& m, const spec_locations& L) {
  std::map<std::string, int> names;
  for (int i = 0; i < m.tiers_size(); ++i) {
    const job::Tier& t = m.tiers(i);
    const std::string key = fmt::format("memory.tiers[{}]", i);
    if (t.name().empty()) L.fail(key + ".name", "is missing; give each tier a name (e.g. dram, cxl0)");
    if (auto [it, fresh] = names.emplace(t.name(), i); !fresh)
      L.fail(key + ".name", fmt::format("'{}' is also the name of memory.tiers[{}]; tier names must be unique",
                                        t.name(), it->second));
    if (t.numa_nodes().empty())
      L.fail(key + ".numa_nodes", fmt::format("is empty; list the NUMA nodes of tier '{}' (`troupe info` shows them)",
                                              t.name()));
    for (int64_t n : t.numa_nodes())
      if (n < 0 || n > 4095) L.fail(key + ".numa_nodes", fmt::format("holds {}, not a NUMA node number", n));
    if (!t.capacity().empty()) {
      int64_t cap = 0;
      try {
        cap = parse_byte_size(t.capacity(), key + ".capacity");
      } catch (const error& e) {
        L.fail(key + ".capacity", fmt::format("is not a size: {}", e.message()));
      }
      if (cap <= 0) L.fail(key + ".capacity", "must be positive (or leave it out for the nodes' total memory)");
    }
    if (!(t.emulated_gbps() >= 0))
      L.fail(key + ".emulated_gbps", fmt::format("must be >= 0 (0 = no cap), got {}", t.emulated_gbps()));
    if (!(t.emulated_latency_ns() >= 0))
      L.fail(key + ".emulated_latency_ns", fmt::format("must be >= 0 (0 = none), got {}", t.emulated_latency_ns()));
    if (t.kind() == job::Tier::DRAM && (t.emulated_gbps() > 0 || t.emulated_latency_ns() > 0))
      L.fail(key + ".kind", fmt::format("is dram but tier '{}' sets emulated_gbps/emulated_latency_ns; emulation "
                                        "applies to cxl tiers only: set kind: cxl or drop the emulation", t.name()));
  }
}

void validate_optimizer_and_rest(job::JobSpec& s, const spec_locations& L) {
  const auto& o = s.optimizer();
  const auto& t = s.train();
  if (t.max_steps() <= 0) L.fail("train.max_steps", fmt::format("must be positive, got {}", t.max_steps()));
  if (t.eval_every_steps() < 0) {
    L.fail("train.eval_every_steps", fmt::format("must be >= 0 (0 = only at the end), got {}", t.eval_every_steps()));
  }
  if (t.eval_batches() <= 0) L.fail("train.eval_batches", fmt::format("must be positive, got {}", t.eval_batches()));
  if (!(o.lr() > 0)) L.fail("optimizer.lr", fmt::format("must be positive, got {}", o.lr()));
  if (!(o.min_lr() >= 0 && o.min_lr() <= o.lr())) {
    L.fail("optimizer.min_lr", fmt::format("must be in [0, optimizer.lr = {}], got {}", o.lr(), o.min_lr()));
  }
  if (o.warmup_steps() < 0) L.fail("optimizer.warmup_steps", fmt::format("must be >= 0, got {}", o.warmup_steps()));
  if (o.warmup_steps() > t.max_steps()) {
    L.fail("optimizer.warmup_steps",
           fmt::format("= {} exceeds train.max_steps = {} (at {}); lower warmup_steps or raise max_steps",
                       o.warmup_steps(), t.max_steps(), L.of("train.max_steps")));
  }
  if (o.betas_size() != 2) {
    L.fail("optimizer.betas", fmt::format("must hold exactly two values [beta1, beta2], got {}", o.betas_size()));
  }
  for (double beta : o.betas()) {
    if (!(beta >= 0 && beta < 1)) L.fail("optimizer.betas", fmt::format("values must be in [0, 1), got {}", beta));
  }
  if (!(o.eps() > 0)) L.fail("optimizer.eps", fmt::format("must be positive, got {}", o.eps()));
  if (!(o.weight_decay() >= 0)) L.fail("optimizer.weight_decay", fmt::format("must be >= 0, got {}", o.weight_decay()));
  if (!(o.grad_clip() >= 0)) L.fail("optimizer.grad_clip", fmt::format("must be >= 0 (0 = off), got {}", o.grad_clip()));

  const auto& m = s.memory();
  auto bytes_of = [&](const std::string& key, const std::string& text) {
    try {
      return parse_byte_size(text, key);
    } catch (const error& e) {
      L.fail(key, fmt::format("is not a size: {}", e.what()));
    }
  };
  if (!m.device_budget().empty() && bytes_of("memory.device_budget", m.device_budget()) <= 0)
    L.fail("memory.device_budget", "must be positive (or leave it out for no budget)");
  if (!m.host_limit().empty()) bytes_of("memory.host_limit", m.host_limit());
  if (!(m.planner_time_limit_s() >= 0))
    L.fail("memory.planner_time_limit_s", fmt::format("must be >= 0 (0 = 10 s), got {}", m.planner_time_limit_s()));
  if (const std::string& a = m.memo().alpha(); !a.empty() && lower(a) != "auto") {
    char* end = nullptr;
    const double v = std::strtod(a.c_str(), &end);
    if (end != a.c_str() + a.size() || !(v >= 0 && v <= 1))
      L.fail("memory.memo.alpha", fmt::format("must be auto or a number in [0, 1], got '{}'", a));
  }
  if (m.memo().has_keep_last_layers() && m.memo().keep_last_layers() < 0)
    L.fail("memory.memo.keep_last_layers", fmt::format("must be >= 0, got {}", m.memo().keep_last_layers()));
  if (!(m.memo().copy_bandwidth_gbps() >= 0))
    L.fail("memory.memo.copy_bandwidth_gbps",
           fmt::format("must be >= 0 (0 = no cap), got {}", m.memo().copy_bandwidth_gbps()));

  validate_tiers(m, L);
  if (!m.placement().empty() && m.placement() != "latency_first" && m.placement() != "dram_only" &&
      m.placement() != "interleave_all" && m.placement() != "cxl_only")
    L.fail("memory.placement", fmt::format("must be one of latency_first, dram_only, interleave_all, cxl_only, got "
                                           "'{}' (leave it out for latency_first when memory.tiers are declared)",
                                           m.placement()));
  if (!m.local_dram_budget().empty() && bytes_of("memory.local_dram_budget", m.local_dram_budget()) < 0)
    L.fail("memory.local_dram_budget", "must be >= 0 (or leave it out for the dram tier's capacity)");

  const auto& d = s.data();
  if (d.train().empty()) L.fail("data.train", "is missing; give the training file (text or a .bin of tokens)");
  const bool bin = d.train().size() >= 4 && d.train().compare(d.train().size() - 4, 4, ".bin") == 0;
  if (d.format() == job::Data::TEXT && bin) {
    L.fail("data.format", fmt::format("is text but data.train {} looks like a token file; set data.format to "
                                      "tokens_u16 or tokens_u32", d.train()));
  }
  if (d.format() != job::Data::TEXT && !bin) {
    L.fail("data.format", fmt::format("is {} but data.train {} is not a .bin token file; set data.format to "
                                      "text for raw text", lower(job::Data::Format_Name(d.format())), d.train()));
  }
  if (!(d.val_fraction() >= 0 && d.val_fraction() < 1)) {
    L.fail("data.val_fraction", fmt::format("must be in [0, 1), got {}", d.val_fraction()));
  }
  if (s.checkpoint().every_steps() < 0) {
    L.fail("checkpoint.every_steps",
           fmt::format("must be >= 0 (0 = only at the end), got {}", s.checkpoint().every_steps()));
  }
  if (s.checkpoint().keep() < 0) {
    L.fail("checkpoint.keep", fmt::format("must be >= 0 (0 = keep all), got {}", s.checkpoint().keep()));
  }
  if (s.logging().every_steps() < 1) {
    L.fail("logging.every_steps", fmt::format("must be >= 1, got {}", s.logging().every_steps()));
  }
  if (s.run_dir().empty()) L.fail("run_dir", "is empty; give the directory for checkpoints and metrics");
  if (s.checkpoint().dir().empty()) s.mutable_checkpoint()->set_dir(s.run_dir() + "/checkpoints");
  if (s.logging().metrics_jsonl().empty()) s.mutable_logging()->set_metrics_jsonl(s.run_dir() + "/metrics.jsonl");
}

void validate(job::JobSpec& spec, const spec_locations& L) {
  validate_model(spec, L);
  validate_batch_and_parallel(spec, L);
  validate_optimizer_and_rest(spec, L);
}

// ---------------------------------------------------------------- YAML -> proto

#ifdef TROUPE_HAVE_YAML_CPP

std::string mark_str(const std::string& source, const YAML::Mark& m) {
  if (m.is_null()) return source;
  return fmt::format("{}:{}:{}", source, m.line + 1, m.column + 1);
}

const char* kind_name(const YAML::Node& n) {
  if (n.IsMap()) return "a mapping";
  if (n.IsSequence()) return "a list";
  if (n.IsNull()) return "nothing";
  return "a scalar";
}

class yaml_mapper {
 public:
  explicit yaml_mapper(spec_locations& L) : L_(L) {}

  // "file:line:col", or the `--set` that wrote the key or a key above it.
  std::string where(const std::string& key_path, const YAML::Mark& m) const {
    std::string kp;  // list indices dropped: `--set memory.tiers=[...]` wrote memory.tiers[1].name
    for (size_t i = 0; i < key_path.size(); ++i) {
      if (key_path[i] == '[') i = key_path.find(']', i);
      else kp += key_path[i];
      if (i == std::string::npos) break;
    }
    for (size_t end = 0; end != std::string::npos;) {
      end = kp.find('.', end + 1);
      if (auto it = L_.overrides.find(kp.substr(0, end)); it != L_.overrides.end()) return it->second;
    }
    return mark_str(L_.source, m);
  }

  void map_message(const YAML::Node& node, pb::Message& msg, const std::string& path,
                   const YAML::Mark& mark) {
    const pb::Descriptor* desc = msg.GetDescriptor();
    if (!node.IsNull() && !node.IsMap()) {
      fail(path.empty() ? "the job spec" : fmt::format("`{}`", path), path, mark,
           fmt::format("must be a mapping of keys ({}: ...), got {}", field_names(desc)[0], describe_node(node)));
    }
    if (desc == job::CreateModel::descriptor()) {
      auto preset = job::CreateModel::TINY;
      if (node.IsMap() && node["preset"]) {
        preset = static_cast<job::CreateModel::Preset>(
            parse_enum(node["preset"], job::CreateModel::Preset_descriptor(), path + ".preset"));
      }
      apply_create_preset(static_cast<job::CreateModel&>(msg), preset);
    }
    if (node.IsNull()) return;
    std::map<std::string, std::string> seen;  // key -> where
    for (const auto& kv : node) {
      const YAML::Node& key = kv.first;
      const YAML::Node& value = kv.second;
      if (!key.IsScalar()) {
        fail(fmt::format("a key of `{}`", path.empty() ? "the job spec" : path), path, key.Mark(),
             "must be a plain name");
      }
      const std::string name = key.Scalar();
      const std::string kp = path.empty() ? name : path + "." + name;
      const std::string key_at = where(kp, key.Mark());
      if (auto it = seen.find(name); it != seen.end()) {
        TROUPE_THROW(errc::invalid_argument, "`{}` at {} is given twice (first at {}); keep one", kp, key_at,
                     it->second);
      }
      const pb::FieldDescriptor* field = desc->FindFieldByName(name);
      if (field == nullptr) {
        const auto known = field_names(desc);
        TROUPE_THROW(errc::invalid_argument, "unknown key `{}` at {}{} ({} takes: {})", kp, key_at,
                     did_you_mean(name, known), path.empty() ? "the top level" : fmt::format("`{}`", path),
                     join(known));
      }
      if (const pb::OneofDescriptor* oneof = field->containing_oneof()) {
        for (int i = 0; i < oneof->field_count(); ++i) {
          const auto* other = oneof->field(i);
          if (other != field && seen.count(other->name())) {
            TROUPE_THROW(errc::invalid_argument,
                         "`{}` at {} conflicts with `{}.{}` at {}: give only one of {}", kp, key_at, path,
                         other->name(), seen[other->name()], join(oneof_names(oneof)));
          }
        }
      }
      seen[name] = key_at;
      // A null value (`lr:`) has its mark where the parser next stopped: point at the key.
      const YAML::Mark vm = value.IsNull() || value.Mark().is_null() ? key.Mark() : value.Mark();
      L_.at[kp] = where(kp, vm);
      set_field(value, vm, msg, field, kp);
    }
  }

 private:
  static std::vector<std::string> oneof_names(const pb::OneofDescriptor* o) {
    std::vector<std::string> out;
    for (int i = 0; i < o->field_count(); ++i) out.push_back(o->field(i)->name());
    return out;
  }

  static std::string describe_node(const YAML::Node& n) {
    return n.IsScalar() ? fmt::format("'{}'", n.Scalar()) : kind_name(n);
  }

  [[noreturn]] void fail(const std::string& what, const std::string& kp, const YAML::Mark& m,
                         const std::string& problem) const {
    TROUPE_THROW(errc::invalid_argument, "{} at {} {}", what, where(kp, m), problem);
  }
  [[noreturn]] void fail_key(const std::string& kp, const YAML::Node& n, const std::string& problem) const {
    fail(fmt::format("`{}`", kp), kp, n.Mark(), problem);
  }

  const std::string& scalar(const YAML::Node& n, const std::string& kp, const char* expected) const {
    if (!n.IsScalar()) fail_key(kp, n, fmt::format("must be {}, got {}", expected, kind_name(n)));
    return n.Scalar();
  }

  template <typename Int>
  Int parse_int(const YAML::Node& n, const std::string& kp) const {
    const bool is_unsigned = std::is_unsigned_v<Int>;
    const char* expected = is_unsigned ? "a non-negative integer" : "an integer";
    const std::string& s = scalar(n, kp, expected);
    const char* first = s.data();
    if (!s.empty() && s[0] == '+') ++first;
    Int v{};
    auto [ptr, ec] = std::from_chars(first, s.data() + s.size(), v);
    if (ec == std::errc::result_out_of_range) {
      fail_key(kp, n, fmt::format("must be {} in [{}, {}], got '{}'", expected, std::numeric_limits<Int>::min(),
                                  std::numeric_limits<Int>::max(), s));
    }
    if (s.empty() || ec != std::errc() || ptr != s.data() + s.size()) {
      fail_key(kp, n, fmt::format("must be {}, got '{}'", expected, s));
    }
    return v;
  }

  double parse_double(const YAML::Node& n, const std::string& kp) const {
    const std::string& s = scalar(n, kp, "a number");
    char* end = nullptr;
    const double v = s.empty() ? 0.0 : std::strtod(s.c_str(), &end);
    if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(v)) {
      fail_key(kp, n, fmt::format("must be a finite number, got '{}'", s));
    }
    return v;
  }

  bool parse_bool(const YAML::Node& n, const std::string& kp) const {
    const std::string s = lower(scalar(n, kp, "true or false"));
    if (s == "true") return true;
    if (s == "false") return false;
    fail_key(kp, n, fmt::format("must be true or false, got '{}'", n.Scalar()));
  }

  int parse_enum(const YAML::Node& n, const pb::EnumDescriptor* e, const std::string& kp) const {
    const auto names = enum_names(e);
    const std::string& s = scalar(n, kp, fmt::format("one of {}", join(names)).c_str());
    for (int i = 0; i < e->value_count(); ++i) {
      if (names[static_cast<size_t>(i)] == s) return e->value(i)->number();
    }
    fail_key(kp, n, fmt::format("must be one of {}, got '{}'{}", join(names), s, did_you_mean(s, names)));
  }

  void set_field(const YAML::Node& value, const YAML::Mark& mark, pb::Message& msg,
                 const pb::FieldDescriptor* f, const std::string& kp) {
    const pb::Reflection* r = msg.GetReflection();
    if (f->is_repeated()) {
      if (!value.IsSequence()) {
        fail(fmt::format("`{}`", kp), kp, mark, fmt::format("must be a list like [a, b], got {}", describe_node(value)));
      }
      r->ClearField(&msg, f);
      if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {  // a list of mappings
        size_t i = 0;
        for (const auto& item : value) {
          const std::string ikp = fmt::format("{}[{}]", kp, i++);
          const YAML::Mark im = item.Mark().is_null() ? mark : item.Mark();
          if (!item.IsMap()) fail(fmt::format("`{}`", ikp), ikp, im, fmt::format("must be a mapping of keys ({}: ...), got {}",
                                                                                 field_names(f->message_type())[0],
                                                                                 describe_node(item)));
          L_.at[ikp] = where(ikp, im);
          map_message(item, *r->AddMessage(&msg, f), ikp, im);
        }
        return;
      }
      for (const auto& item : value) {
        switch (f->cpp_type()) {
          case pb::FieldDescriptor::CPPTYPE_DOUBLE: r->AddDouble(&msg, f, parse_double(item, kp)); break;
          case pb::FieldDescriptor::CPPTYPE_INT64: r->AddInt64(&msg, f, parse_int<int64_t>(item, kp)); break;
          case pb::FieldDescriptor::CPPTYPE_STRING: r->AddString(&msg, f, scalar(item, kp, "a string")); break;
          default: TROUPE_THROW(errc::internal, "job_spec: repeated field `{}` of this type is not mapped", kp);
        }
      }
      return;
    }
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      map_message(value, *r->MutableMessage(&msg, f), kp, mark);
      return;
    }
    if (value.IsNull()) {
      fail(fmt::format("`{}`", kp), kp, mark, "has no value; write one, or remove the key to take the default");
    }
    switch (f->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_INT32: r->SetInt32(&msg, f, parse_int<int32_t>(value, kp)); break;
      case pb::FieldDescriptor::CPPTYPE_INT64: r->SetInt64(&msg, f, parse_int<int64_t>(value, kp)); break;
      case pb::FieldDescriptor::CPPTYPE_UINT32: r->SetUInt32(&msg, f, parse_int<uint32_t>(value, kp)); break;
      case pb::FieldDescriptor::CPPTYPE_UINT64: r->SetUInt64(&msg, f, parse_int<uint64_t>(value, kp)); break;
      case pb::FieldDescriptor::CPPTYPE_DOUBLE: r->SetDouble(&msg, f, parse_double(value, kp)); break;
      case pb::FieldDescriptor::CPPTYPE_FLOAT:
        r->SetFloat(&msg, f, static_cast<float>(parse_double(value, kp)));
        break;
      case pb::FieldDescriptor::CPPTYPE_BOOL: r->SetBool(&msg, f, parse_bool(value, kp)); break;
      case pb::FieldDescriptor::CPPTYPE_STRING: r->SetString(&msg, f, scalar(value, kp, "a string")); break;
      case pb::FieldDescriptor::CPPTYPE_ENUM:
        r->SetEnumValue(&msg, f, parse_enum(value, f->enum_type(), kp));
        break;
      default: TROUPE_THROW(errc::internal, "job_spec: field `{}` of this type is not mapped", kp);
    }
  }

  spec_locations& L_;
};

// `--set optimizer.lr=1e-3`: writes the value (YAML: `[0.9, 0.99]`, `{lr: 1}` work) into
// the tree before mapping, creating the mappings on the way; errors name the `--set`.
// Setting one member of a oneof (model.path) drops the others (model.create) from the file.
void apply_override(YAML::Node& root, const std::string& assignment, spec_locations& L) {
  const std::string where = fmt::format("--set {}", assignment);
  const size_t eq = assignment.find('=');
  TROUPE_CHECK(eq != std::string::npos && eq > 0, errc::invalid_argument,
               "{}: expected KEY=VALUE with a dotted key, e.g. --set optimizer.lr=1e-3", where);
  const std::string kp = assignment.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(assignment.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    TROUPE_THROW(errc::format, "{}: the value is not valid YAML: {}", where, e.msg);
  }
  if (!root.IsDefined() || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  YAML::Node cur = root;
  std::string done;
  const pb::Descriptor* desc = job::JobSpec::descriptor();  // of `cur`, while known
  for (size_t start = 0; start <= kp.size();) {
    size_t end = kp.find('.', start);
    if (end == std::string::npos) end = kp.size();
    const std::string comp = kp.substr(start, end - start);
    TROUPE_CHECK(!comp.empty(), errc::invalid_argument, "{}: `{}` has an empty key part", where, kp);
    TROUPE_CHECK(cur.IsMap() || cur.IsNull() || !cur.IsDefined(), errc::invalid_argument,
                 "{}: `{}` is {}, not a mapping with key `{}`", where, done, kind_name(cur), comp);
    const pb::FieldDescriptor* field = desc != nullptr ? desc->FindFieldByName(comp) : nullptr;
    if (field != nullptr && field->containing_oneof() != nullptr && cur.IsMap()) {
      const pb::OneofDescriptor* oneof = field->containing_oneof();
      for (int i = 0; i < oneof->field_count(); ++i) {
        if (oneof->field(i) != field) cur.remove(oneof->field(i)->name());
      }
    }
    desc = field != nullptr ? field->message_type() : nullptr;
    done += (done.empty() ? "" : ".") + comp;
    cur.reset(cur[comp]);
    start = end + 1;
  }
  cur = value;
  L.overrides[kp] = where;
}

#endif  // TROUPE_HAVE_YAML_CPP

// ---------------------------------------------------------------- proto -> YAML

std::string yaml_quote(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          out += fmt::format("\\x{:02x}", static_cast<unsigned char>(ch));
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::string scalar_text(const pb::Message& m, const pb::FieldDescriptor* f, int index) {
  const pb::Reflection* r = m.GetReflection();
  const bool rep = f->is_repeated();
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32:
      return fmt::format("{}", rep ? r->GetRepeatedInt32(m, f, index) : r->GetInt32(m, f));
    case pb::FieldDescriptor::CPPTYPE_INT64:
      return fmt::format("{}", rep ? r->GetRepeatedInt64(m, f, index) : r->GetInt64(m, f));
    case pb::FieldDescriptor::CPPTYPE_UINT32:
      return fmt::format("{}", rep ? r->GetRepeatedUInt32(m, f, index) : r->GetUInt32(m, f));
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      return fmt::format("{}", rep ? r->GetRepeatedUInt64(m, f, index) : r->GetUInt64(m, f));
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
      return fmt::format("{}", rep ? r->GetRepeatedDouble(m, f, index) : r->GetDouble(m, f));
    case pb::FieldDescriptor::CPPTYPE_FLOAT:
      return fmt::format("{}", rep ? r->GetRepeatedFloat(m, f, index) : r->GetFloat(m, f));
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      return (rep ? r->GetRepeatedBool(m, f, index) : r->GetBool(m, f)) ? "true" : "false";
    case pb::FieldDescriptor::CPPTYPE_STRING:
      return yaml_quote(rep ? r->GetRepeatedString(m, f, index) : r->GetString(m, f));
    case pb::FieldDescriptor::CPPTYPE_ENUM:
      return lower((rep ? r->GetRepeatedEnum(m, f, index) : r->GetEnum(m, f))->name());
    default: return "~";
  }
}

void emit(const pb::Message& m, int indent, std::string& out) {
  const pb::Descriptor* d = m.GetDescriptor();
  const pb::Reflection* r = m.GetReflection();
  const std::string pad(static_cast<size_t>(indent), ' ');
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    if (f->containing_oneof() != nullptr && !r->HasField(m, f)) continue;
    out += fmt::format("{}{}:", pad, f->name());
    if (f->is_repeated() && f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (r->FieldSize(m, f) == 0) {
        out += " []\n";
        continue;
      }
      out += "\n";
      for (int j = 0; j < r->FieldSize(m, f); ++j) {  // "  - key: v" then "    key: v"
        std::string item;
        emit(r->GetRepeatedMessage(m, f, j), indent + 4, item);
        item.replace(static_cast<size_t>(indent) + 2, 2, "- ");
        out += item;
      }
    } else if (f->is_repeated()) {
      std::vector<std::string> items;
      for (int j = 0; j < r->FieldSize(m, f); ++j) items.push_back(scalar_text(m, f, j));
      out += fmt::format(" [{}]\n", join(items));
    } else if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      out += "\n";
      emit(r->GetMessage(m, f), indent + 2, out);
    } else {
      out += fmt::format(" {}\n", scalar_text(m, f, -1));
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- public API

void expert_parallel_defaults(job::ExpertParallel& x) {  // ALGORITHMS.md "LLEP", parallel/ep/ep_rebalance.h
  x.set_mode("llep");
  x.set_lambda(1.3);
  x.set_alpha(1.0);
  x.set_min_chunk(1024);
  x.set_eplb_redundant_per_rank(1);
  auto* rb = x.mutable_rebalance();
  rb->set_enabled(false);
  rb->set_threshold(1.25);
  rb->set_patience(3);
  rb->set_cooldown(10);
  rb->set_decay(0.8);
  rb->set_min_improvement(0.1);
}

job::JobSpec job_spec_defaults() {
  job::JobSpec s;
  auto* rope = s.mutable_model()->mutable_rope_scaling();
  rope->set_type(job::RopeScaling::NONE);
  rope->set_factor(1.0);
  rope->set_original_max_position(0);
  rope->set_beta_fast(32.0);
  rope->set_beta_slow(1.0);
  rope->set_low_freq_factor(1.0);
  rope->set_high_freq_factor(4.0);

  auto* memo = s.mutable_memory()->mutable_memo();
  memo->set_alpha("auto");
  memo->set_keep_last_layers(2);

  auto* d = s.mutable_data();
  d->set_format(job::Data::TEXT);
  d->set_val_fraction(0.1);
  d->set_seed(1234);

  auto* b = s.mutable_batch();
  b->set_seq_len(256);
  b->set_micro_batch(1);
  b->set_global_batch(0);  // derived
  b->set_grad_accum(0);    // derived

  auto* o = s.mutable_optimizer();
  o->set_lr(3e-4);
  o->set_min_lr(0.0);
  o->set_warmup_steps(0);
  o->add_betas(0.9);
  o->add_betas(0.95);
  o->set_eps(1e-8);
  o->set_weight_decay(0.1);
  o->set_grad_clip(1.0);

  auto* t = s.mutable_train();
  t->set_max_steps(1000);
  t->set_eval_every_steps(100);
  t->set_eval_batches(8);

  auto* p = s.mutable_parallel();
  p->set_dp(1);
  p->set_cp(1);
  p->set_cp_mode(job::Parallel::ULYSSES);
  p->set_ep(1);
  expert_parallel_defaults(*p->mutable_expert());

  s.mutable_checkpoint()->set_every_steps(500);
  s.mutable_checkpoint()->set_keep(2);
  s.mutable_logging()->set_every_steps(10);
  s.set_seed(1234);
  s.set_run_dir("runs/train");
  return s;
}

void validate_job_spec(job::JobSpec& spec, const std::string& source_name) {
  validate(spec, spec_locations{source_name, {}, {}});
}

int64_t job_world_size(const job::JobSpec& spec) { return spec.parallel().dp() * spec.parallel().cp(); }

int64_t parse_byte_size(const std::string& text, const std::string& what) {
  std::string t;
  for (char ch : text)
    if (ch != ' ' && ch != '_') t += ch;
  char* end = nullptr;
  const double v = t.empty() ? -1 : std::strtod(t.c_str(), &end);
  TROUPE_CHECK(!t.empty() && end != t.c_str() && std::isfinite(v) && v >= 0, errc::invalid_argument,
               "{}: '{}' is not a size (write e.g. 24GiB, 512MiB, 1.5GB or a number of bytes)", what, text);
  const std::string unit = lower(std::string(end));
  static const std::pair<const char*, double> units[] = {
      {"", 1},           {"b", 1},          {"k", 1024.0},     {"kib", 1024.0},   {"kb", 1e3},
      {"m", 1048576.0},  {"mib", 1048576.0}, {"mb", 1e6},      {"g", 1073741824.0}, {"gib", 1073741824.0},
      {"gb", 1e9},       {"t", 1099511627776.0}, {"tib", 1099511627776.0}, {"tb", 1e12}};
  for (const auto& [name, mult] : units)
    if (unit == name) {
      const double b = v * mult;
      TROUPE_CHECK(b < 9.0e18, errc::invalid_argument, "{}: '{}' is too large", what, text);
      return static_cast<int64_t>(std::llround(b));
    }
  TROUPE_THROW(errc::invalid_argument, "{}: '{}' has an unknown unit '{}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)",
               what, text, std::string(end));
}

int64_t job_device_budget(const job::JobSpec& spec) {
  const std::string& b = spec.memory().device_budget();
  return b.empty() ? 0 : parse_byte_size(b, "memory.device_budget");
}

double job_memo_alpha(const job::JobSpec& spec) {
  const std::string& a = spec.memory().memo().alpha();
  if (a.empty() || lower(a) == "auto") return -1;
  return std::strtod(a.c_str(), nullptr);
}

int64_t job_memo_keep_last_layers(const job::JobSpec& spec) {
  return spec.memory().memo().has_keep_last_layers() ? spec.memory().memo().keep_last_layers() : 2;
}

int64_t job_host_limit(const job::JobSpec& spec) {
  const std::string& h = spec.memory().host_limit();
  return h.empty() ? 0 : parse_byte_size(h, "memory.host_limit");
}

std::string job_host_placement(const job::JobSpec& spec) {
  const std::string& p = spec.memory().placement();
  if (!p.empty()) return p;
  return spec.memory().tiers_size() > 0 ? "latency_first" : "";
}

int64_t job_local_dram_budget(const job::JobSpec& spec, const std::vector<memory_tier>& tiers) {
  const std::string& b = spec.memory().local_dram_budget();
  if (!b.empty()) return parse_byte_size(b, "memory.local_dram_budget");
  for (const auto& t : tiers)
    if (t.type == memory_tier::dram) return t.capacity_bytes;
  return 0;
}

std::vector<memory_tier> tiers_from_spec(const job::JobSpec& spec, const std::vector<numa_node_info>& machine) {
  if (spec.memory().tiers_size() == 0) return tiers_of_nodes(machine);
  std::string existing;
  for (const auto& n : machine)
    existing += fmt::format("{}{} ({}, {:.1f} GiB)", existing.empty() ? "" : ", ", n.node,
                            n.cpus > 0 ? "dram" : "cpu-less", static_cast<double>(n.total_bytes) / (1 << 30));
  std::vector<memory_tier> out;
  for (int i = 0; i < spec.memory().tiers_size(); ++i) {
    const job::Tier& jt = spec.memory().tiers(i);
    memory_tier t;
    t.name = jt.name();
    t.type = jt.kind() == job::Tier::CXL ? memory_tier::cxl : memory_tier::dram;
    t.emulated_gbps = jt.emulated_gbps();
    t.emulated_latency_ns = jt.emulated_latency_ns();
    int64_t nodes_bytes = 0;
    bool any_cpus = false;
    for (int64_t n : jt.numa_nodes()) {
      auto it = std::find_if(machine.begin(), machine.end(), [&](const numa_node_info& x) { return x.node == n; });
      TROUPE_CHECK(it != machine.end(), errc::invalid_argument,
                   "memory.tiers[{}] ('{}'): NUMA node {} does not exist on this machine (nodes with memory: {}); "
                   "map the tier onto one of those", i, jt.name(), n, existing);
      if (std::find(t.numa_nodes.begin(), t.numa_nodes.end(), static_cast<int>(n)) != t.numa_nodes.end()) continue;
      t.numa_nodes.push_back(static_cast<int>(n));
      nodes_bytes += it->total_bytes;
      any_cpus = any_cpus || it->cpus > 0;
    }
    t.capacity_bytes = jt.capacity().empty() ? nodes_bytes
                                             : parse_byte_size(jt.capacity(), fmt::format("memory.tiers[{}].capacity", i));
    TROUPE_CHECK(t.capacity_bytes <= nodes_bytes, errc::invalid_argument,
                 "memory.tiers[{}] ('{}'): capacity {} ({} bytes) exceeds the memory of its nodes ({} bytes); lower "
                 "the capacity or add nodes", i, jt.name(), jt.capacity(), t.capacity_bytes, nodes_bytes);
    t.emulated = t.type == memory_tier::cxl && (any_cpus || t.emulated_gbps > 0 || t.emulated_latency_ns > 0);
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<memory_tier> tiers_from_spec(const job::JobSpec& spec) {
  return tiers_from_spec(spec, numa_nodes_with_memory());
}

std::string describe(const job::JobSpec& spec) {
  std::string out = "# troupe job spec, defaults filled in\n";
  emit(spec, 0, out);
  return out;
}

namespace {
// YAML text -> msg (holding its defaults) through the mapper; the locations of every key written.
spec_locations map_yaml(const std::string& yaml_text, const std::string& source_name,
                        const std::vector<std::string>& overrides, google::protobuf::Message& msg) {
#ifdef TROUPE_HAVE_YAML_CPP
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    TROUPE_THROW(errc::format, "{} is not valid YAML: {}", mark_str(source_name, e.mark), e.msg);
  }
  spec_locations L{source_name, {}, {}};
  for (const auto& o : overrides) apply_override(root, o, L);
  yaml_mapper(L).map_message(root, msg, "", root.Mark());
  return L;
#else
  (void)yaml_text, (void)overrides, (void)msg;
  TROUPE_THROW(errc::unsupported, "{}: specs need yaml-cpp, which this build lacks; install libyaml-cpp-dev "
               "and reconfigure", source_name);
#endif
}
}  // namespace

job::JobSpec parse_job_spec(const std::string& yaml_text, const std::string& source_name,
                            const std::vector<std::string>& overrides) {
  job::JobSpec spec = job_spec_defaults();
  validate(spec, map_yaml(yaml_text, source_name, overrides, spec));
  return spec;
}

std::string read_spec_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    TROUPE_CHECK(std::filesystem::exists(path), errc::not_found, "{} file {} not found", what, path);
    TROUPE_THROW(errc::io, "{} file {} cannot be read", what, path);
  }
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

job::JobSpec load_job_spec(const std::string& path, const std::vector<std::string>& overrides) {
  return parse_job_spec(read_spec_file(path, "job"), path, overrides);
}

void parse_yaml_spec(const std::string& yaml_text, const std::string& source_name,
                     const std::vector<std::string>& overrides, google::protobuf::Message& msg,
                     const std::function<void(google::protobuf::Message&, const spec_fail&)>& validate) {
  const spec_locations L = map_yaml(yaml_text, source_name, overrides, msg);
  if (validate) validate(msg, [&L](const std::string& key, const std::string& problem) { L.fail(key, problem); });
}

std::string describe_spec(const google::protobuf::Message& msg, const std::string& title) {
  std::string out = "# " + title + "\n";
  emit(msg, 0, out);
  return out;
}

}  // namespace troupe::runtime
