// runtime/io/safetensors.cpp — the safetensors reader (header validation, mmap, views)
// and the checkpoint-directory index. The writer is in safetensors_write.cpp.
#include "runtime/io/safetensors.h"

#include "runtime/io/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace troupe::runtime {

namespace {

using ordered_json = nlohmann::ordered_json;

// The safetensors reference implementation refuses headers above 100 MB.
constexpr uint64_t max_header_bytes = 100'000'000;

// File offset of the first `"name"` in the header text (for error messages), or 0.
size_t header_pos_of(const std::string& header, const std::string& name) {
  try {
    size_t pos = header.find(ordered_json(name).dump());
    return pos == std::string::npos ? 0 : 8 + pos;
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
}

std::string describe_json_type(const ordered_json& v) {
  if (v.is_number_float()) return fmt::format("the float {}", v.dump());
  if (v.is_string()) return fmt::format("the string {}", v.dump());
  return fmt::format("{} ({})", v.type_name(), v.dump().substr(0, 40));
}

// Reads one header entry ({dtype, shape, data_offsets}) into `e`, or throws.
void parse_entry(const std::string& label, const std::string& header, const std::string& name, const ordered_json& v,
                 size_t data_size, safetensors_entry& e) {
  const size_t at = header_pos_of(header, name);
  auto fail = [&](const std::string& what) {
    TROUPE_THROW(errc::format, "{}: tensor '{}' (file byte {}): {}", label, name, at, what);
  };
  if (!v.is_object())
    fail(fmt::format("entry must be a JSON object {{dtype, shape, data_offsets}}, got {}", describe_json_type(v)));
  auto dt_it = v.find("dtype");
  if (dt_it == v.end()) fail("missing key \"dtype\"");
  if (!dt_it->is_string()) fail(fmt::format("\"dtype\" must be a string, got {}", describe_json_type(*dt_it)));
  const std::string dt_name = dt_it->get<std::string>();
  auto dt = dtype_from_name(dt_name);
  if (!dt || dt_name != dtype_safetensors_name(*dt))
    fail(fmt::format("unknown dtype \"{}\"; troupe reads F32, BF16, F16, I32, I64 and U8 (convert the checkpoint)",
                     dt_name));
  e.name = name;
  e.dtype = *dt;

  auto sh_it = v.find("shape");
  if (sh_it == v.end()) fail("missing key \"shape\"");
  if (!sh_it->is_array())
    fail(fmt::format("\"shape\" must be an array of integers, got {}", describe_json_type(*sh_it)));
  e.shape.clear();
  int64_t numel = 1;
  for (const auto& d : *sh_it) {
    if (!d.is_number_integer()) fail(fmt::format("shape dimension {} is not an integer", d.dump()));
    if (d.is_number_unsigned() ? d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX) : d.get<int64_t>() < 0)
      fail(fmt::format("shape dimension {} must be a non-negative 64-bit integer", d.dump()));
    const int64_t dim = d.get<int64_t>();
    if (__builtin_mul_overflow(numel, dim, &numel))
      fail(fmt::format("shape {} has more elements than fit in 64 bits", sh_it->dump()));
    e.shape.push_back(dim);
  }

  auto off_it = v.find("data_offsets");
  if (off_it == v.end()) fail("missing key \"data_offsets\"");
  const auto& off = *off_it;
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_integer() || !off[1].is_number_integer() ||
      !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
    fail(fmt::format("\"data_offsets\" must be [begin, end], two non-negative integers, got {}",
                     off.dump().substr(0, 60)));
  const uint64_t b = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
  if (b > end) fail(fmt::format("data_offsets [{}, {}]: begin is after end", b, end));
  if (end > data_size)
    fail(
        fmt::format("data_offsets [{}, {}] end past the data section ({} bytes; the file ends at data byte {}) — "
                    "the file is truncated or the header is wrong",
                    b, end, data_size, data_size));
  uint64_t want = 0;
  const bool overflow =
      __builtin_mul_overflow(static_cast<uint64_t>(numel), static_cast<uint64_t>(dtype_size(e.dtype)), &want);
  if (overflow || want != end - b)
    fail(fmt::format("data_offsets [{}, {}] hold {} bytes but {} {} needs {} x {} = {} bytes", b, end, end - b, dt_name,
                     shape_str(e.shape), numel, dtype_size(e.dtype),
                     overflow ? std::string("(overflow)") : std::to_string(want)));
  e.begin = static_cast<size_t>(b);
  e.end = static_cast<size_t>(end);
}

}  // namespace

safetensors_file safetensors_file::from_bytes(std::shared_ptr<void> owner, const char* data, size_t size,
                                              const std::string& label) {
  TROUPE_CHECK(size >= 8, errc::format,
               "{}: {} bytes is too short for a safetensors file (it starts with an 8-byte header length)", label,
               size);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(data[i]);  // little-endian
  TROUPE_CHECK(n <= size - 8, errc::format,
               "{}: byte 0: header length {} runs past the end of the file ({} bytes); the file is truncated or "
               "not safetensors",
               label, n, size);
  TROUPE_CHECK(n <= max_header_bytes, errc::format, "{}: byte 0: header length {} exceeds the 100 MB limit", label, n);

  const std::string header(data + 8, static_cast<size_t>(n));
  // Duplicate top-level names would silently overwrite each other in the parsed object.
  std::string duplicate;
  std::set<std::string> seen;
  ordered_json::parser_callback_t on_event = [&](int depth, ordered_json::parse_event_t ev, ordered_json& parsed) {
    if (ev == ordered_json::parse_event_t::key && depth == 1 && parsed.is_string()) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  ordered_json j;
  try {
    j = ordered_json::parse(header.begin(), header.end(), on_event);
  } catch (const nlohmann::json::parse_error& e) {
    TROUPE_THROW(errc::format, "{}: file byte {}: malformed JSON header ({})", label, 8 + (e.byte > 0 ? e.byte - 1 : 0),
                 e.what());
  } catch (const nlohmann::json::exception& e) {
    TROUPE_THROW(errc::format, "{}: malformed JSON header ({})", label, e.what());
  }
  TROUPE_CHECK(j.is_object(), errc::format, "{}: byte 8: the header must be a JSON object, got {}", label,
               j.type_name());
  TROUPE_CHECK(duplicate.empty(), errc::format, "{}: tensor '{}' (file byte {}): the name appears twice in the header",
               label, duplicate, header_pos_of(header, duplicate));

  safetensors_file f;
  f.path_ = label;
  f.data_offset_ = 8 + static_cast<size_t>(n);
  f.data_size_ = size - f.data_offset_;
  f.data_ = data + f.data_offset_;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      const auto& m = it.value();
      TROUPE_CHECK(m.is_object(), errc::format,
                   "{}: \"__metadata__\" (file byte {}) must be an object of strings, got {}", label,
                   header_pos_of(header, "__metadata__"), m.type_name());
      for (auto mi = m.begin(); mi != m.end(); ++mi) {
        TROUPE_CHECK(mi.value().is_string(), errc::format,
                     "{}: \"__metadata__\".\"{}\" (file byte {}) must be a string, got {}", label, mi.key(),
                     header_pos_of(header, mi.key()), mi.value().type_name());
        f.metadata_[mi.key()] = mi.value().get<std::string>();
      }
      continue;
    }
    safetensors_entry e;
    parse_entry(label, header, it.key(), it.value(), f.data_size_, e);
    f.index_[e.name] = f.entries_.size();
    f.entries_.push_back(std::move(e));
  }

  // No two non-empty byte ranges may overlap.
  std::vector<const safetensors_entry*> by_begin;
  for (const auto& e : f.entries_)
    if (e.end > e.begin) by_begin.push_back(&e);
  std::sort(by_begin.begin(), by_begin.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_begin.size(); ++i) {
    const auto* prev = by_begin[i - 1];
    const auto* cur = by_begin[i];
    TROUPE_CHECK(cur->begin >= prev->end, errc::format,
                 "{}: tensor '{}' (data bytes [{}, {}), file byte {}) overlaps tensor '{}' (data bytes [{}, {}))",
                 label, cur->name, cur->begin, cur->end, f.data_offset_ + cur->begin, prev->name, prev->begin,
                 prev->end);
  }
  f.owner_ = std::move(owner);
  return f;
}

safetensors_file safetensors_file::open(const std::string& path) {
  // Private copy-on-write: a caller writing into a view never changes the file.
  const mapped_file m = map_file(path, "safetensors file", /*copy_on_write=*/true);
  const size_t size = m.size;
  TROUPE_CHECK(size >= 8, errc::format,
               "{}: {} bytes is too short for a safetensors file (it starts with an 8-byte header length)", path, size);
  return from_bytes(m.owner, m.data, size, path);
}

const safetensors_entry& safetensors_file::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::string some;
    for (size_t i = 0; i < entries_.size() && i < 3; ++i) some += (i ? ", " : "") + entries_[i].name;
    TROUPE_THROW(errc::not_found, "{}: no tensor named '{}' ({} tensors{}{})", path_, name, entries_.size(),
                 entries_.empty() ? "" : ", e.g. ", some);
  }
  return entries_[it->second];
}

std::vector<std::string> safetensors_file::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& e : entries_) out.push_back(e.name);
  return out;
}

tensor safetensors_file::get(const std::string& name) const {
  const safetensors_entry& e = entry(name);
  char* p = const_cast<char*>(data_ + e.begin);  // the mapping is private (copy-on-write)
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) != 0) {
    tensor t = tensor::empty(e.shape, e.dtype);
    std::memcpy(t.data_ptr(), p, e.end - e.begin);
    return t;
  }
  return tensor::from_blob(p, e.shape, e.dtype, device::cpu(), owner_);
}

tensor safetensors_file::get_as(const std::string& name, runtime::dtype dt, const shape_t& expected_shape) const {
  const safetensors_entry& e = entry(name);
  TROUPE_CHECK(expected_shape.empty() || expected_shape == e.shape, errc::format,
               "{}: tensor '{}' has shape {} but the model expects {}; the checkpoint does not match the config", path_,
               name, shape_str(e.shape), shape_str(expected_shape));
  return get(name).to(dt);
}

// ---- safetensors_index -----------------------------------------------------------

safetensors_index safetensors_index::open_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  safetensors_index idx;
  idx.dir_ = dir;
  std::error_code ec;
  if (fs::is_regular_file(dir, ec)) {  // a single file given directly
    idx.files_.push_back(safetensors_file::open(dir));
    for (auto& n : idx.files_[0].names()) {
      idx.where_[n] = 0;
      idx.names_.push_back(n);
    }
    return idx;
  }
  TROUPE_CHECK(fs::is_directory(dir, ec), errc::not_found, "{}: checkpoint directory does not exist", dir);
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  try {
    if (!fs::exists(index_path, ec)) {
      TROUPE_CHECK(fs::exists(single_path, ec), errc::not_found,
                   "{}: no model.safetensors or model.safetensors.index.json in this directory", dir);
      idx.files_.push_back(safetensors_file::open(single_path.string()));
      for (auto& n : idx.files_[0].names()) {
        idx.where_[n] = 0;
        idx.names_.push_back(n);
      }
      return idx;
    }
    std::ifstream in(index_path);
    TROUPE_CHECK(in.good(), errc::io, "{}: cannot read", index_path.string());
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    ordered_json j;
    try {
      j = ordered_json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      TROUPE_THROW(errc::format, "{}: malformed JSON ({})", index_path.string(), e.what());
    }
    TROUPE_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), errc::format,
                 "{}: expected {{\"weight_map\": {{tensor name: file name}}}}", index_path.string());
    std::map<std::string, size_t> file_slot;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      TROUPE_CHECK(it.value().is_string(), errc::format, "{}: weight_map.\"{}\" must be a file name string, got {}",
                   index_path.string(), it.key(), it.value().type_name());
      const std::string file = it.value().get<std::string>();
      TROUPE_CHECK(!file.empty() && fs::path(file).is_relative() && file.find("..") == std::string::npos, errc::format,
                   "{}: weight_map.\"{}\" = \"{}\" must be a file name inside the directory", index_path.string(),
                   it.key(), file);
      auto [slot, inserted] = file_slot.emplace(file, idx.files_.size());
      if (inserted) {
        const fs::path fp = fs::path(dir) / file;
        TROUPE_CHECK(fs::exists(fp, ec), errc::not_found, "{}: weight_map.\"{}\" names {}, which does not exist",
                     index_path.string(), it.key(), fp.string());
        idx.files_.push_back(safetensors_file::open(fp.string()));
      }
      const safetensors_file& f = idx.files_[slot->second];
      TROUPE_CHECK(f.contains(it.key()), errc::format,
                   "{}: weight_map says tensor '{}' is in {}, but that file has no such tensor", index_path.string(),
                   it.key(), file);
      if (idx.where_.emplace(it.key(), slot->second).second) idx.names_.push_back(it.key());
    }
  } catch (error& e) {
    e.add_context(fmt::format("while opening the checkpoint directory {}", dir));
    throw;
  }
  return idx;
}

bool safetensors_index::contains(const std::string& name) const { return where_.count(name) != 0; }

const safetensors_entry& safetensors_index::entry(const std::string& name) const {
  auto it = where_.find(name);
  TROUPE_CHECK(it != where_.end(), errc::not_found, "{}: checkpoint has no tensor named '{}' ({} tensors)", dir_, name,
               names_.size());
  return files_[it->second].entry(name);
}

tensor safetensors_index::get(const std::string& name) const {
  entry(name);
  return files_[where_.at(name)].get(name);
}

tensor safetensors_index::get_as(const std::string& name, runtime::dtype dt, const shape_t& expected_shape) const {
  entry(name);
  return files_[where_.at(name)].get_as(name, dt, expected_shape);
}

std::vector<std::string> safetensors_index::names() const { return names_; }

}  // namespace troupe::runtime
