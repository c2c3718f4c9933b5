// parallel/train/metrics.cpp — metrics.jsonl writer and reader, progress/summary formatting.
// (The report paragraph and the SVG are in metrics_report.cpp.)
#include "parallel/train/metrics.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <utility>

#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::parallel {

using runtime::errc;
using json = nlohmann::json;

namespace {

void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    TROUPE_CHECK(w > 0, errc::io, "{}: write failed: {}", path, std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void pread_all(int fd, char* p, size_t n, off_t at, const std::string& path) {
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, at);
    if (r < 0 && errno == EINTR) continue;
    TROUPE_CHECK(r > 0, errc::io, "{}: read failed at byte {}: {}", path, at, r < 0 ? std::strerror(errno) : "EOF");
    p += r;
    at += r;
    n -= static_cast<size_t>(r);
  }
}

// Invariant 1: a torn last line (no "\n") left by a crash is dropped, or ended when it parses.
void repair_torn_tail(int fd, const std::string& path) {
  struct stat st {};
  TROUPE_CHECK(::fstat(fd, &st) == 0, errc::io, "{}: fstat failed: {}", path, std::strerror(errno));
  const off_t size = st.st_size;
  if (size == 0) return;
  char last = 0;
  pread_all(fd, &last, 1, size - 1, path);
  if (last == '\n') return;
  // Scan back for the last newline, one block at a time.
  off_t start = 0;
  char buf[4096];
  for (off_t end = size; end > 0;) {
    const off_t begin = end > static_cast<off_t>(sizeof buf) ? end - static_cast<off_t>(sizeof buf) : 0;
    pread_all(fd, buf, static_cast<size_t>(end - begin), begin, path);
    const void* nl = ::memrchr(buf, '\n', static_cast<size_t>(end - begin));
    if (nl != nullptr) {
      start = begin + (static_cast<const char*>(nl) - buf) + 1;
      break;
    }
    end = begin;
  }
  std::string tail(static_cast<size_t>(size - start), '\0');
  pread_all(fd, tail.data(), tail.size(), start, path);
  const json parsed = json::parse(tail, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_discarded() && parsed.is_object()) {
    write_all(fd, "\n", 1, path);
    return;
  }
  runtime::log::warn("{}: dropping a torn last line ({} bytes at byte {}) left by an interrupted run", path,
                     tail.size(), start);
  TROUPE_CHECK(::ftruncate(fd, start) == 0, errc::io, "{}: ftruncate failed: {}", path, std::strerror(errno));
}

std::string format_fixed_unit(double v, const char* unit) {
  // One decimal below 10, none above: "1.2 GiB", "812 KiB".
  return v < 9.95 ? fmt::format("{:.1f} {}", v, unit) : fmt::format("{:.0f} {}", v, unit);
}

std::string group_thousands(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -static_cast<uint64_t>(v) : static_cast<uint64_t>(v));
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}

const json* field(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

// A number field as double; NaN is stored as null, so null reads back as NaN.
bool get_number(const json& obj, const char* key, double& out) {
  const json* f = field(obj, key);
  if (f == nullptr) return false;
  if (f->is_number()) {
    out = f->get<double>();
    return true;
  }
  if (f->is_null()) {
    out = std::nan("");
    return true;
  }
  return false;
}

// Memory tiers print in this order, then any others by name.
int tier_rank(const std::string& tier) {
  static const char* const order[] = {"host", "pinned", "device", "cxl"};
  for (int i = 0; i < 4; ++i)
    if (tier == order[i]) return i;
  return 4;
}

}  // namespace

// ---- metrics_writer -------------------------------------------------------------------------

metrics_writer::metrics_writer(std::string path) : path_(std::move(path)) {
  TROUPE_CHECK(!path_.empty(), errc::invalid_argument, "metrics_writer: empty path");
  const std::filesystem::path parent = std::filesystem::path(path_).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    TROUPE_CHECK(!ec, errc::io, "{}: cannot create directory {}: {}", path_, parent.string(), ec.message());
  }
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  TROUPE_CHECK(fd_ >= 0, errc::io, "{}: cannot open metrics file for appending: {}", path_, std::strerror(errno));
  try {
    repair_torn_tail(fd_, path_);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

metrics_writer::~metrics_writer() {
  if (fd_ >= 0) ::close(fd_);
}

metrics_writer::metrics_writer(metrics_writer&& other) noexcept
    : path_(std::move(other.path_)), fd_(std::exchange(other.fd_, -1)) {}

metrics_writer& metrics_writer::operator=(metrics_writer&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

void metrics_writer::write(const json& record) {
  TROUPE_CHECK(fd_ >= 0, errc::invalid_argument, "metrics_writer: write after move");
  TROUPE_CHECK(record.is_object(), errc::invalid_argument, "{}: a metrics record must be a JSON object, got {}",
               path_, record.type_name());
  // Compact dump escapes newlines inside strings, so the record is exactly one line.
  std::string line = record.dump(-1, ' ', false, json::error_handler_t::replace);
  line += '\n';
  write_all(fd_, line.data(), line.size(), path_);
}

// ---- read_metrics ---------------------------------------------------------------------------

std::vector<json> read_metrics(const std::string& path) {
  std::error_code ec;
  TROUPE_CHECK(std::filesystem::is_regular_file(path, ec), errc::not_found, "{}: no such metrics file", path);
  std::ifstream in(path, std::ios::binary);
  TROUPE_CHECK(in.good(), errc::io, "{}: cannot open: {}", path, std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();

  std::vector<json> records;
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const bool has_newline = nl != std::string::npos;
    std::string_view line(text.data() + pos, (has_newline ? nl : text.size()) - pos);
    pos = has_newline ? nl + 1 : text.size();
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;
    json j;
    std::string why;
    try {
      j = json::parse(line);
      if (!j.is_object()) why = fmt::format("expected a JSON object, got {}", j.type_name());
    } catch (const json::parse_error& e) {
      why = e.what();
    }
    if (why.empty()) {
      records.push_back(std::move(j));
      continue;
    }
    if (!has_newline) {  // torn by a crash mid-write (invariant 2)
      runtime::log::warn("{}:{}: skipping a truncated last line ({} bytes)", path, line_no, line.size());
      break;
    }
    TROUPE_THROW(errc::format, "{}:{}: {}; each line of a metrics file is one JSON object", path, line_no, why);
  }
  return records;
}

// ---- formatting -----------------------------------------------------------------------------

std::string format_bytes(int64_t bytes) {
  if (bytes < 0) return "-" + format_bytes(bytes == INT64_MIN ? INT64_MAX : -bytes);
  if (bytes < 1024) return fmt::format("{} B", bytes);
  static const char* const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes) / 1024.0;
  size_t u = 0;
  // Move up a unit when the rounded value would print as 1024.
  while (v >= 1023.5 && u + 1 < std::size(units)) {
    v /= 1024.0;
    ++u;
  }
  return format_fixed_unit(v, units[u]);
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = std::llround(seconds);
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  if (s < 86400) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  return fmt::format("{}d{:02}h", s / 86400, (s % 86400) / 3600);
}

std::string format_rate(double v) {
  if (!std::isfinite(v)) return fmt::format("{}", v);
  if (v < 0) return "-" + format_rate(-v);
  static const char* const suffix[] = {"", "k", "M", "G", "T"};
  size_t u = 0;
  while (v >= 999.5 && u + 1 < std::size(suffix)) {
    v /= 1000.0;
    ++u;
  }
  if (u == 0) return fmt::format("{:.0f}", v);
  // Three significant digits: "5.12k", "51.2k", "512k".
  if (v < 9.995) return fmt::format("{:.2f}{}", v, suffix[u]);
  if (v < 99.95) return fmt::format("{:.1f}{}", v, suffix[u]);
  return fmt::format("{:.0f}{}", v, suffix[u]);
}

std::string format_progress(const progress_info& p) {
  std::string s = p.max_steps > 0 ? fmt::format("step {}/{}", p.step, p.max_steps) : fmt::format("step {}", p.step);
  s += fmt::format(" | loss {:.4f} | lr {:.1e} | {} tok/s", p.loss, p.lr, format_rate(p.tokens_per_s));
  if (std::isfinite(p.mfu) && p.mfu > 0) s += fmt::format(" | MFU {:.1f}%", p.mfu * 100.0);
  if (!p.mem.empty()) {
    std::vector<std::pair<std::string, int64_t>> tiers(p.mem.begin(), p.mem.end());
    std::stable_sort(tiers.begin(), tiers.end(),
                     [](const auto& a, const auto& b) { return tier_rank(a.first) < tier_rank(b.first); });
    s += " |";
    for (const auto& [tier, bytes] : tiers) s += fmt::format(" {} {}", tier, format_bytes(bytes));
  }
  s += fmt::format(" | ETA {}", format_duration(p.eta_s));
  return s;
}

std::string format_summary(const json& start, const json& summary) {
  std::vector<std::pair<std::string, std::string>> rows;
  double v = 0;
  auto loss_row = [&](const char* key, const char* label) {
    if (get_number(summary, key, v)) rows.emplace_back(label, fmt::format("{:.4f}", v));
  };
  if (get_number(summary, "steps", v)) rows.emplace_back("steps", fmt::format("{}", std::llround(v)));
  if (get_number(summary, "tokens", v)) rows.emplace_back("tokens", group_thousands(std::llround(v)));
  if (get_number(summary, "elapsed_s", v)) rows.emplace_back("elapsed", format_duration(v));
  if (get_number(summary, "tokens_per_s", v)) rows.emplace_back("throughput", format_rate(v) + " tok/s");
  if (get_number(summary, "mfu", v) && std::isfinite(v) && v > 0)
    rows.emplace_back("MFU", fmt::format("{:.1f}%", v * 100.0));
  loss_row("final_loss", "final loss");
  loss_row("initial_val_loss", "val loss at start");
  loss_row("final_val_loss", "final val loss");
  loss_row("best_val_loss", "best val loss");
  if (get_number(start, "params", v)) {
    std::string model = format_rate(v) + " params";
    if (get_number(start, "seq_len", v)) model += fmt::format(", seq_len {}", std::llround(v));
    if (get_number(start, "global_batch_tokens", v))
      model += fmt::format(", {} tokens/step", group_thousands(std::llround(v)));
    rows.emplace_back("model", model);
  }
  if (get_number(start, "world_size", v)) {
    std::string ranks = fmt::format("{}", std::llround(v));
    double dp = 0, cp = 0;
    if (get_number(start, "dp", dp) && get_number(start, "cp", cp))
      ranks += fmt::format(" (dp {} x cp {})", std::llround(dp), std::llround(cp));
    rows.emplace_back("ranks", ranks);
  }
  if (const json* c = field(summary, "checkpoint"); c != nullptr && c->is_string())
    rows.emplace_back("checkpoint", c->get<std::string>());

  size_t width = 0;
  for (const auto& r : rows) width = std::max(width, r.first.size());
  std::string out = "run summary\n";
  for (const auto& [label, value] : rows) out += fmt::format("  {:<{}}  {}\n", label, width, value);
  return out;
}

}  // namespace troupe::parallel
