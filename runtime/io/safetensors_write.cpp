// runtime/io/safetensors_write.cpp — the atomic safetensors writer.
//
// Layout: [8-byte little-endian header length N][N bytes of JSON, space-padded so that
// 8 + N is a multiple of 8][data]. Data is ordered by decreasing dtype size (stable), so
// every tensor starts at a multiple of its element size and the data section has no holes
// (the Python/Rust reader rejects holes).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "runtime/io/safetensors.h"

namespace troupe::runtime {

namespace {

void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    TROUPE_CHECK(w > 0, errc::io, "{}: write failed: {}", path, w < 0 ? std::strerror(errno) : "wrote 0 bytes");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void fsync_parent_dir(const std::string& path) {
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (parent.empty()) parent = ".";
  int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);  // best effort: makes the rename durable
    ::close(dfd);
  }
}

}  // namespace

void safetensors_write(const std::string& path, const std::vector<std::pair<std::string, tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Validate and bring every tensor to contiguous host memory.
  std::vector<tensor> host(tensors.size());
  std::set<std::string> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    TROUPE_CHECK(name != "__metadata__", errc::invalid_argument,
                 "{}: '__metadata__' is reserved and cannot name a tensor", path);
    TROUPE_CHECK(names.insert(name).second, errc::invalid_argument, "{}: tensor '{}' is given twice", path, name);
    TROUPE_CHECK(t.defined(), errc::invalid_argument, "{}: tensor '{}' is undefined", path, name);
    host[i] = t.to(device::cpu()).contiguous();
  }

  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return dtype_size(host[a].dtype()) > dtype_size(host[b].dtype()); });
  std::vector<std::pair<size_t, size_t>> offsets(tensors.size());
  size_t cursor = 0;
  for (size_t i : order) {
    offsets[i] = {cursor, cursor + host[i].nbytes()};
    cursor += host[i].nbytes();
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    header[tensors[i].first] = {{"dtype", dtype_safetensors_name(host[i].dtype())},
                                {"shape", host[i].shape()},
                                {"data_offsets", {offsets[i].first, offsets[i].second}}};
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    TROUPE_THROW(errc::invalid_argument, "{}: a tensor name or metadata string is not valid UTF-8 ({})", path,
                 e.what());
  }
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  char len_bytes[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((n >> (8 * i)) & 0xffu);

  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TROUPE_CHECK(fd >= 0, errc::io, "{}: cannot create: {}", tmp, std::strerror(errno));
  try {
    write_all(fd, len_bytes, 8, tmp);
    write_all(fd, text.data(), text.size(), tmp);
    for (size_t i : order) write_all(fd, static_cast<const char*>(host[i].data_ptr()), host[i].nbytes(), tmp);
    TROUPE_CHECK(::fsync(fd) == 0, errc::io, "{}: fsync failed: {}", tmp, std::strerror(errno));
    const int rc = ::close(fd);
    fd = -1;
    TROUPE_CHECK(rc == 0, errc::io, "{}: close failed: {}", tmp, std::strerror(errno));
    TROUPE_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, errc::io, "rename {} -> {} failed: {}", tmp, path,
                 std::strerror(errno));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_parent_dir(path);
}

}  // namespace troupe::runtime
