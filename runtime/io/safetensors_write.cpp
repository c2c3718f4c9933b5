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

#include "runtime/io/file_io.h"

namespace troupe::runtime {

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

  atomic_file_writer w(path);
  w.write(len_bytes, 8);
  w.write(text.data(), text.size());
  for (size_t i : order) w.write(host[i].data_ptr(), host[i].nbytes());
  w.commit();
}

}  // namespace troupe::runtime
