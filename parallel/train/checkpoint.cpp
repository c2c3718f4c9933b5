// parallel/train/checkpoint.cpp — atomic step directories, `latest`, pruning, validated load.
#include "parallel/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#include "runtime/error.h"
#include "runtime/io/safetensors.h"
#include "runtime/log.h"

namespace troupe::parallel {

namespace fs = std::filesystem;
using runtime::errc;
using runtime::shape_t;
using runtime::tensor;

namespace {

constexpr const char* k_config = "config.json";
constexpr const char* k_model = "model.safetensors";
constexpr const char* k_optimizer = "optimizer.safetensors";
constexpr const char* k_state = "trainer_state.json";
constexpr const char* k_latest = "latest";
constexpr const char* k_tmp_prefix = ".tmp-";
constexpr const char* k_moments[2] = {"exp_avg", "exp_avg_sq"};

// "step-00000123" -> 123; -1 for anything else (only "step-" followed by 1..18 digits).
int64_t parse_step_dir(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() == 5 || name.size() > 5 + 18) return -1;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

// The last component of a directory path, ignoring a trailing slash.
std::string base_name(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    TROUPE_CHECK(w > 0, errc::io, "{}: write failed: {}", path, w < 0 ? std::strerror(errno) : "wrote 0 bytes");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Creates (or truncates) path with text, fsync'ed before it returns.
void write_file_synced(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TROUPE_CHECK(fd >= 0, errc::io, "{}: cannot create: {}", path, std::strerror(errno));
  try {
    write_all(fd, text.data(), text.size(), path);
    TROUPE_CHECK(::fsync(fd) == 0, errc::io, "{}: fsync failed: {}", path, std::strerror(errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  TROUPE_CHECK(::close(fd) == 0, errc::io, "{}: close failed: {}", path, std::strerror(errno));
}

// Makes a directory's entries (creations, renames) durable.
void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  TROUPE_CHECK(fd >= 0, errc::io, "{}: cannot open directory for fsync: {}", dir, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  TROUPE_CHECK(rc == 0, errc::io, "{}: fsync of the directory failed: {}", dir, std::strerror(err));
}

void rename_or_throw(const std::string& from, const std::string& to) {
  TROUPE_CHECK(::rename(from.c_str(), to.c_str()) == 0, errc::io, "rename {} -> {} failed: {}", from, to,
               std::strerror(errno));
}

// Best effort: a leftover is removed by the next save anyway.
void remove_tree(const fs::path& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
  if (ec) runtime::log::warn("checkpoint: cannot remove {}: {}", p.string(), ec.message());
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TROUPE_CHECK(in.good(), errc::io, "{}: cannot read", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// (step, dir name) of every step-* directory under root, newest first.
std::vector<std::pair<int64_t, std::string>> list_step_dirs(const std::string& root) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const int64_t step = parse_step_dir(name);
    std::error_code ec2;
    if (step >= 0 && it->is_directory(ec2)) out.emplace_back(step, name);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

// trainer_state.json parsed and checked: an object with an integer "step", equal to the
// directory's step when the directory is named step-N.
nlohmann::json read_state(const std::string& dir) {
  const std::string path = (fs::path(dir) / k_state).string();
  TROUPE_CHECK(fs::exists(path), errc::not_found, "{}: missing; a checkpoint directory holds {}, {}, {} and {}", path,
               k_config, k_model, k_optimizer, k_state);
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(read_text(path));
  } catch (const nlohmann::json::exception& e) {
    TROUPE_THROW(errc::format, "{}: not valid JSON ({}); the file is damaged", path, e.what());
  }
  TROUPE_CHECK(state.is_object(), errc::format, "{}: expected a JSON object, found {}", path, state.type_name());
  TROUPE_CHECK(state.contains("step"), errc::not_found, "{}: key \"step\" is missing", path);
  TROUPE_CHECK(state["step"].is_number_integer(), errc::format, "{}: key \"step\" must be an integer, found {}", path,
               state["step"].dump());
  const int64_t dir_step = parse_step_dir(base_name(dir));
  TROUPE_CHECK(dir_step < 0 || state["step"].get<int64_t>() == dir_step, errc::format,
               "{}: key \"step\" is {} but the directory {} is step {}; the file belongs to another checkpoint",
               path, state["step"].get<int64_t>(), base_name(dir), dir_step);
  return state;
}

// "" when dir is a complete checkpoint (invariant 4 of the header), else why not.
std::string incomplete_reason(const std::string& dir) {
  try {
    for (const char* f : {k_config, k_model, k_optimizer, k_state}) {
      const std::string p = (fs::path(dir) / f).string();
      TROUPE_CHECK(fs::is_regular_file(p), errc::not_found, "{}: missing", p);
    }
    runtime::safetensors_file::open((fs::path(dir) / k_model).string());
    runtime::safetensors_file::open((fs::path(dir) / k_optimizer).string());
    read_state(dir);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// Same parameter names and shapes, f32, as the weights.
void check_same_layout(const model_weights& w, const model_weights& m, const char* what) {
  const auto a = w.parameters();
  const auto b = m.parameters();
  TROUPE_CHECK(a.size() == b.size(), errc::invalid_argument,
               "save_checkpoint: {} has {} parameters, the weights have {}; pass moments made with "
               "model_weights::zeros_like(weights)",
               what, b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TROUPE_CHECK(a[i].first == b[i].first && a[i].second.shape() == b[i].second.shape(), errc::invalid_argument,
                 "save_checkpoint: {} parameter {} is \"{}\" {}, the weights have \"{}\" {}", what, i, b[i].first,
                 runtime::shape_str(b[i].second.shape()), a[i].first, runtime::shape_str(a[i].second.shape()));
    TROUPE_CHECK(b[i].second.dtype() == runtime::dtype::f32, errc::invalid_argument,
                 "save_checkpoint: {} tensor \"{}\" is {}, expected f32", what, b[i].first,
                 runtime::dtype_name(b[i].second.dtype()));
  }
}

// Writes the four files into the (fresh) directory dir and syncs it.
void write_checkpoint_files(const std::string& dir, const model_weights& weights, const model_weights& exp_avg,
                            const model_weights& exp_avg_sq, const nlohmann::json& state) {
  const fs::path d(dir);
  write_file_synced((d / k_config).string(), runtime::hf_config_to_json(weights.config()) + "\n");
  runtime::safetensors_write((d / k_model).string(), weights.parameters(), {{"format", "pt"}});
  std::vector<std::pair<std::string, tensor>> moments;
  const model_weights* sets[2] = {&exp_avg, &exp_avg_sq};
  for (int k = 0; k < 2; ++k)
    for (auto& [name, t] : sets[k]->parameters()) moments.emplace_back(fmt::format("{}.{}", k_moments[k], name), t);
  runtime::safetensors_write((d / k_optimizer).string(), moments, {{"format", "pt"}});
  write_file_synced((d / k_state).string(), state.dump(2) + "\n");
  fsync_dir(dir);
}

// Moves the complete directory tmp to final; an existing final is swapped out first.
void install_dir(const fs::path& root, const std::string& tmp, const std::string& final_dir) {
  std::error_code ec;
  if (!fs::exists(final_dir, ec)) {
    rename_or_throw(tmp, final_dir);
    return;
  }
  // Atomic exchange: final becomes the new dir, tmp the old one.
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
    remove_tree(tmp);
    return;
  }
  // The filesystem cannot exchange: move the old dir aside, then the new one in.
  const std::string old = (root / fmt::format("{}old-{}-{}", k_tmp_prefix, base_name(final_dir), ::getpid())).string();
  rename_or_throw(final_dir, old);
  rename_or_throw(tmp, final_dir);
  remove_tree(old);
}

// Keeps `just_written` plus the newest others, `keep` in all; older ones are renamed to
// .tmp-* (so a crash mid-delete leaves no partial step dir) and deleted.
void prune(const fs::path& root, const std::string& just_written, int64_t keep) {
  if (keep <= 0) return;
  int64_t kept = 1;
  for (const auto& [step, name] : list_step_dirs(root.string())) {
    if (name == just_written) continue;
    if (kept < keep) {
      ++kept;
      continue;
    }
    const fs::path doomed = root / fmt::format("{}prune-{}-{}", k_tmp_prefix, name, ::getpid());
    std::error_code ec;
    fs::rename(root / name, doomed, ec);
    if (ec) {
      runtime::log::warn("checkpoint: cannot prune {}: {}", (root / name).string(), ec.message());
      continue;
    }
    remove_tree(doomed);
  }
}

}  // namespace

std::string checkpoint_dir_name(int64_t step) { return fmt::format("step-{:08d}", step); }

std::string save_checkpoint(const std::string& root_str, int64_t step, const model_weights& weights,
                            const model_weights& exp_avg, const model_weights& exp_avg_sq, nlohmann::json state,
                            int64_t keep) {
  TROUPE_CHECK(step >= 0, errc::invalid_argument, "save_checkpoint: step must be >= 0, got {}", step);
  TROUPE_CHECK(keep >= 0, errc::invalid_argument, "save_checkpoint: keep must be >= 0 (0 = keep all), got {}", keep);
  TROUPE_CHECK(!weights.parameters().empty(), errc::invalid_argument, "save_checkpoint: the weights are empty");
  check_same_layout(weights, exp_avg, "exp_avg");
  check_same_layout(weights, exp_avg_sq, "exp_avg_sq");
  if (state.is_null()) state = nlohmann::json::object();
  TROUPE_CHECK(state.is_object(), errc::invalid_argument, "save_checkpoint: state must be a JSON object, got {}",
               state.type_name());
  state["step"] = step;

  const fs::path root(root_str);
  std::error_code ec;
  fs::create_directories(root, ec);
  TROUPE_CHECK(!ec, errc::io, "save_checkpoint: cannot create directory {}: {}", root_str, ec.message());

  // Leftovers of crashed saves and prunes (one writer per root).
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().filename().string().rfind(k_tmp_prefix, 0) == 0) {
      runtime::log::info("checkpoint: removing {} (left by an interrupted save)", it->path().string());
      remove_tree(it->path());
    }
  }

  const std::string name = checkpoint_dir_name(step);
  const std::string tmp = (root / fmt::format("{}{}-{}", k_tmp_prefix, name, ::getpid())).string();
  const std::string final_dir = (root / name).string();
  fs::create_directory(tmp, ec);
  TROUPE_CHECK(!ec, errc::io, "save_checkpoint: cannot create directory {}: {}", tmp, ec.message());
  try {
    write_checkpoint_files(tmp, weights, exp_avg, exp_avg_sq, state);
    install_dir(root, tmp, final_dir);
    fsync_dir(root_str);
  } catch (...) {
    remove_tree(tmp);
    throw;
  }

  const std::string latest_tmp = (root / fmt::format("{}latest-{}", k_tmp_prefix, ::getpid())).string();
  write_file_synced(latest_tmp, name + "\n");
  rename_or_throw(latest_tmp, (root / k_latest).string());
  fsync_dir(root_str);

  prune(root, name, keep);
  return final_dir;
}

std::string latest_checkpoint(const std::string& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return "";
  const fs::path latest = fs::path(root) / k_latest;
  if (fs::exists(latest, ec)) {
    std::string name;
    try {
      name = read_text(latest.string());
    } catch (const runtime::error&) {
    }
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
    if (parse_step_dir(name) >= 0) {
      const std::string dir = (fs::path(root) / name).string();
      const std::string why = incomplete_reason(dir);
      if (why.empty()) return dir;
      runtime::log::warn("checkpoint: {} names {}, which is not complete ({}); using the newest complete one",
                         latest.string(), name, why);
    } else {
      runtime::log::warn("checkpoint: {} does not name a step-* directory; using the newest complete one",
                         latest.string());
    }
  }
  for (const auto& [step, name] : list_step_dirs(root)) {
    const std::string dir = (fs::path(root) / name).string();
    const std::string why = incomplete_reason(dir);
    if (why.empty()) return dir;
    runtime::log::warn("checkpoint: skipping {}: {}", dir, why);
  }
  return "";
}

checkpoint_contents load_checkpoint(const std::string& path) {
  std::error_code ec;
  TROUPE_CHECK(fs::is_directory(path, ec), errc::not_found,
               "{}: no such directory; pass a checkpoint directory (step-*) or the root that holds them", path);
  std::string dir = path;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (!fs::exists(fs::path(path) / k_config, ec) && !fs::exists(fs::path(path) / k_state, ec)) {
    dir = latest_checkpoint(path);
    TROUPE_CHECK(!dir.empty(), errc::not_found,
                 "{}: no complete checkpoint here (neither `latest` nor any step-* directory holds {}, {}, {} and {})",
                 path, k_config, k_model, k_optimizer, k_state);
  }

  checkpoint_contents c;
  c.dir = dir;
  c.state = read_state(dir);
  c.step = c.state["step"].get<int64_t>();
  try {
    c.weights = model_weights::load(dir);
  } catch (runtime::error& e) {
    e.add_context(fmt::format("while loading the model of checkpoint {}", dir));
    throw;
  }

  const std::string opt_path = (fs::path(dir) / k_optimizer).string();
  TROUPE_CHECK(fs::exists(opt_path, ec), errc::not_found,
               "{}: missing; a training checkpoint holds the AdamW moments there (a model-only directory "
               "loads with model_weights::load)",
               opt_path);
  const runtime::safetensors_file opt = runtime::safetensors_file::open(opt_path);
  c.exp_avg = model_weights::zeros_like(c.weights);
  c.exp_avg_sq = model_weights::zeros_like(c.weights);
  model_weights* sets[2] = {&c.exp_avg, &c.exp_avg_sq};
  std::set<std::string> expected;
  for (int k = 0; k < 2; ++k) {
    for (auto& p : sets[k]->parameters()) {
      const std::string key = fmt::format("{}.{}", k_moments[k], p.name);
      expected.insert(key);
      TROUPE_CHECK(opt.contains(key), errc::not_found,
                   "{}: tensor \"{}\" is missing (every parameter of config.json's model needs exp_avg.<name> and "
                   "exp_avg_sq.<name>)",
                   opt_path, key);
      const auto& e = opt.entry(key);
      TROUPE_CHECK(e.shape == p.value.shape(), errc::format, "{}: tensor \"{}\" has shape {}, expected {}", opt_path,
                   key, runtime::shape_str(e.shape), runtime::shape_str(p.value.shape()));
      TROUPE_CHECK(runtime::dtype_is_float(e.dtype), errc::format, "{}: tensor \"{}\" has dtype {}, expected f32",
                   opt_path, key, runtime::dtype_name(e.dtype));
      p.value.copy_from(opt.get_as(key, runtime::dtype::f32, p.value.shape()));
    }
  }
  for (const auto& n : opt.names())
    TROUPE_CHECK(expected.count(n), errc::format,
                 "{}: unexpected tensor \"{}\" (not a moment of a parameter of config.json's model)", opt_path, n);
  return c;
}

}  // namespace troupe::parallel
