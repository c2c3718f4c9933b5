// parallel/memo/plan_cache.cpp — the on-disk cache of memory plans.
#include "parallel/memo/plan_cache.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <system_error>
#include <thread>

#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::parallel::memo {

using runtime::errc;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t fnv_offset = 1469598103934665603ull;
constexpr uint64_t fnv_prime = 1099511628211ull;

void fnv_bytes(uint64_t& h, const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= fnv_prime;
  }
}

uint64_t fnv_events(uint64_t h, const std::vector<alloc_event>& ev) {
  const uint64_t n = ev.size();
  fnv_bytes(h, &n, sizeof n);
  for (const auto& e : ev)
    for (int64_t v : {e.size, e.alloc_time, e.free_time}) fnv_bytes(h, &v, sizeof v);
  return h;
}

uint64_t problem_fingerprint(const bilevel_problem& bp) {
  uint64_t h = fnv_offset;
  h = fnv_events(h, bp.layer_forward);
  h = fnv_events(h, bp.layer_backward);
  h = fnv_events(h, bp.global);
  for (const auto* v : {&bp.forward_blocks, &bp.backward_blocks}) {
    const uint64_t n = v->size();
    fnv_bytes(h, &n, sizeof n);
    for (size_t i : *v) {
      const uint64_t x = i;
      fnv_bytes(h, &x, sizeof x);
    }
  }
  return h;
}

std::string hex(uint64_t h) { return fmt::format("{:016x}", h); }

// The stored "plan" object when key, kind and fingerprint match; nullopt (with a warning
// when the file exists but is unusable) otherwise.
std::optional<json> read_entry(const std::string& path, const std::string& key, const char* kind, uint64_t fp) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return std::nullopt;
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) {
    runtime::log::warn("memo plan cache: {} cannot be read; solving again", path);
    return std::nullopt;
  }
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    runtime::log::warn("memo plan cache: {} is not valid JSON (corrupt?); solving again", path);
    return std::nullopt;
  }
  auto str = [&](const char* k) { return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : ""; };
  if (str("key") != key || str("kind") != kind) {
    runtime::log::warn("memo plan cache: {} holds another plan (key \"{}\", kind \"{}\"); solving again", path,
                       str("key"), str("kind"));
    return std::nullopt;
  }
  if (str("fingerprint") != hex(fp)) {
    runtime::log::warn("memo plan cache: {} was planned for another trace (fingerprint {} != {}); solving again", path,
                       str("fingerprint"), hex(fp));
    return std::nullopt;
  }
  if (!j.contains("plan")) {
    runtime::log::warn("memo plan cache: {} has no \"plan\"; solving again", path);
    return std::nullopt;
  }
  return j["plan"];
}

void write_entry(const std::string& dir, const std::string& path, const std::string& key, const char* kind,
                 uint64_t fp, json plan_json) {
  try {
    std::error_code ec;
    fs::create_directories(dir, ec);
    TROUPE_CHECK(!ec, errc::io, "cannot create {}: {}", dir, ec.message());
    const json doc = {{"key", key}, {"kind", kind}, {"fingerprint", hex(fp)}, {"plan", std::move(plan_json)}};
    // pid and thread: ranks run as threads in tests and may write the same plan at once.
    const std::string tmp = fmt::format("{}.tmp-{}-{:x}", path, ::getpid(),
                                        std::hash<std::thread::id>{}(std::this_thread::get_id()));
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << doc.dump() << "\n";
      out.flush();
      TROUPE_CHECK(out.good(), errc::io, "cannot write {}", tmp);
    }
    fs::rename(tmp, path, ec);
    if (ec) {
      fs::remove(tmp, ec);
      TROUPE_THROW(errc::io, "cannot rename {} to {}", tmp, path);
    }
  } catch (const std::exception& e) {
    runtime::log::warn("memo plan cache: not saved: {}", e.what());
  }
}

}  // namespace

std::string plan_cache_path(const std::string& dir, const std::string& key) {
  uint64_t h = fnv_offset;
  fnv_bytes(h, key.data(), key.size());
  return (fs::path(dir) / ("memo-" + hex(h) + ".json")).string();
}

uint64_t events_fingerprint(const std::vector<alloc_event>& ev) { return fnv_events(fnv_offset, ev); }

plan plan_cached(const std::string& dir, const std::string& key, const std::vector<alloc_event>& ev,
                 const planner_options& o, bool* hit) {
  const std::string path = plan_cache_path(dir, key);
  uint64_t fp = events_fingerprint(ev);
  fnv_bytes(fp, &o.alignment, sizeof o.alignment);
  if (hit) *hit = false;
  if (auto j = read_entry(path, key, "plan", fp)) {
    try {
      plan p = plan::from_json(*j);
      verify_plan(ev, p, p.peak);
      int64_t top = 0;
      for (size_t i = 0; i < ev.size(); ++i) top = std::max(top, p.offset[i] + ev[i].size);
      TROUPE_CHECK(top == p.peak, errc::format, "its peak {} is not its offsets' peak {}", p.peak, top);
      if (hit) *hit = true;
      return p;
    } catch (const runtime::error& e) {
      runtime::log::warn("memo plan cache: {} holds an unusable plan ({}); solving again", path, e.what());
    }
  }
  plan p = plan_mip(ev, o);
  write_entry(dir, path, key, "plan", fp, p.to_json());
  return p;
}

bilevel_plan plan_bilevel_cached(const std::string& dir, const std::string& key, const bilevel_problem& bp,
                                 const planner_options& o, bool* hit) {
  const std::string path = plan_cache_path(dir, key);
  uint64_t fp = problem_fingerprint(bp);
  fnv_bytes(fp, &o.alignment, sizeof o.alignment);
  if (hit) *hit = false;
  if (auto j = read_entry(path, key, "bilevel", fp)) {
    try {
      bilevel_plan b = bilevel_plan::from_json(*j);
      TROUPE_CHECK(b.global_events.size() == bp.global.size(), errc::format, "{} global sizes for {} global events",
                   b.global_events.size(), bp.global.size());
      for (size_t i = 0; i < bp.global.size(); ++i) {
        const int64_t size = b.global_events[i].size;
        b.global_events[i] = bp.global[i];
        b.global_events[i].size = size;
      }
      verify_bilevel_plan(bp, b);
      if (hit) *hit = true;
      return b;
    } catch (const runtime::error& e) {
      runtime::log::warn("memo plan cache: {} holds an unusable plan ({}); solving again", path, e.what());
    }
  }
  bilevel_plan b = plan_bilevel(bp, o);
  write_entry(dir, path, key, "bilevel", fp, b.to_json());
  return b;
}

}  // namespace troupe::parallel::memo
